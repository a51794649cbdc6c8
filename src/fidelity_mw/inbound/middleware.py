"""FidelityMiddleware: deadline -> route breaker -> rate limits -> app, pure ASGI.

Order and coordination: a request the deadline or the breaker turns away never
reaches the limiter, so it costs the client no quota; a limiter rejection or a
client disconnect is never counted as a breaker failure. A websocket handshake
on a route with rate limits is admitted by them alone (`websocket`); other
websockets and lifespan scopes pass straight through; bodies stream untouched in both
directions (only the response start message gets headers added), and
`receive` is handed to the app as it is, but for noting the client leaving
before the app answered.

This module is the order of things per request; each concern lives next door:
reading the request (`request`), the store's verdict (`admission`), the
app's response and its outcome (`watch`), our own answers (`responses`).
The allowed path is the hot path: one coroutine, one header scan, one store
call, and decisions left as facts (`ctx._pending`) that become records only
when somebody reads `ctx.decisions`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import Token
from typing import Any, Final, cast

from starlette.requests import ClientDisconnect

from .._logs import exception as log_exception
from .._logs import warn as log_warning
from .._types import ASGIApp, Clock, Message, RandomSource, Receive, Scope, Send
from ..clock import SystemClock
from ..context import (
    _CURRENT,
    INTERPRETED,
    LAYER_CONCURRENCY,
    DecisionContext,
    new_request_context,
)
from ..decide.breaker import SUCCESS
from ..engine import Engine
from ..headers import is_cors_preflight
from ..hooks import AttemptObserver, RequestObserver
from ..policy import BreakerConfig, Policy
from ..policy.model import redact_url
from ..rejections import OnReject, checked_on_reject, custom_rejection, send_custom
from ..routeplan import RoutePlan, costed_plan, ip_keys_of
from ..state.base import InboundResult, StateStore
from .admission import Admission, admission_decisions, ratelimit_headers
from .bulkhead import Bulkheads, HeldSlot
from .cors import CorsAnswers, inner_cors, with_headers
from .costs import CostAnswer, asked_costs, costed_decisions, request_costs, with_costs
from .refusals import control_refusal, deadline_refusal, upstream_failure
from .request import RequestReader, scan_headers
from .responses import (
    DECIDED_BY_APP,
    DECIDED_BY_HEADER,
    OUTCOME_DISCONNECTED,
    OUTCOME_FAILED,
    OUTCOME_SERVED,
    EndsOutside,
    Rejection,
    respond,
)
from .watch import (
    NOT_ASYNCIO,
    CallLater,
    ClientReceive,
    DeadlineWatch,
    GoneReceive,
    OutcomeRecorder,
    ResponseEndHook,
    ResponseWatcher,
    StallWatch,
    response_ends,
    running_loop,
)
from .websocket import WebsocketGate
from .xratelimit import fields_for

logger: Final = logging.getLogger("fidelity_mw")

# (policy version, state) pairs whose startup line this process has logged
_SAID_IN_FORCE: Final[set[tuple[str, str]]] = set()


def log_policy_in_force(engine: Engine) -> None:
    """One INFO line per process and policy when a middleware is built: which policy
    (its version), which state (the URL without its password, or the store), what
    `on_error` does, and how many limits, routes and breakers it holds."""
    policy = engine.policy
    url = policy.state.url
    state = redact_url(url) if url else type(engine.store).__name__
    key = (policy.version, state)
    if key in _SAID_IN_FORCE:
        return
    _SAID_IN_FORCE.add(key)
    breakers = (
        (policy.breaker is not None)
        + sum(isinstance(r.breaker, BreakerConfig) for r in policy.routes)
        + sum(u.breaker is not None for u in policy.upstreams)
    )
    logger.info(
        "fidelity_mw: policy %s in force: state %s, on_error=%s, %d rate limits, "
        "%d routes, %d breaker tables",
        policy.version,
        state,
        policy.state.on_error,
        len(policy.rate_limits),
        len(policy.routes),
        breakers,
    )


# no plan kept for a method (never written to)
_NO_PLANS: Final[dict[str, RoutePlan]] = {}
# plans kept by method and path, at most (as the engine keeps by (method, path))
_MAX_PLANS: Final = 10_000

# The context variable's methods, bound once: a plain call per request (compiled, no
# method lookup by name)
_set_current: Final = _CURRENT.set
_MISSING: Final = Token.MISSING
_reset_current: Final = _CURRENT.reset


class CostDeadline:
    """Arms the request's deadline when a cost function is awaited (inbound/costs.py)."""

    watcher: ResponseWatcher | None = None
    watch: DeadlineWatch
    ctx: DecisionContext
    now: float = 0.0

    def __call__(self) -> None:
        deadline_at = self.ctx.deadline_at
        if self.watcher is None and deadline_at is not None:
            watcher = self.watcher = ResponseWatcher()
            watcher.ctx = self.ctx
            watcher.arm(self.watch, deadline_at, self.now)


class FidelityMiddleware:
    """Deadline, route circuit breaker and rate limiting for one ASGI app.

    `app.add_middleware(FidelityMiddleware, policy=Policy.from_toml("fidelity.toml"))`
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: Policy | None = None,
        engine: Engine | None = None,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        store: StateStore | None = None,
        observer: RequestObserver | None = None,
        telemetry: bool = True,
        answer_refusals: bool = True,
        on_reject: OnReject | None = None,
        tracer_provider: Any = None,  # OpenTelemetry's convention: this app's providers,
        meter_provider: Any = None,  # not the global ones (docs/telemetry.md)
    ) -> None:
        if observer is None and telemetry and (tracer_provider or meter_provider):
            from ..telemetry import telemetry_for

            observer = telemetry_for(tracer_provider, meter_provider)
        self.app = app
        # on_reject(ctx, decision) -> Response | None: shapes rejections (rejections.py)
        self._on_reject = checked_on_reject(on_reject, "FidelityMiddleware")
        self.engine = engine or Engine(policy, clock=clock, rng=rng, store=store)
        self.policy = self.engine.policy
        log_policy_in_force(self.engine)
        if observer is None and telemetry:
            if self.engine.request_observer is None:
                from ..telemetry import default_request_observer

                self.engine.request_observer = default_request_observer(self.engine)
            observer = self.engine.request_observer
        self.observer = observer
        if (
            observer is not None
            and self.engine.attempt_observer is None
            and getattr(observer, "_end_hook_needs_token", False)
        ):
            # A `Telemetry`: a transport inside this app's requests reports to the same
            # providers. Set here, not at a request's start alone (`Telemetry.start`,
            # which without a tracer returns first: a metrics-only setup's attempts went
            # to the global providers, which the transport then set on the engine).
            self.engine.attempt_observer = cast(AttemptObserver, observer)
        if observer is not None and self.engine.request_observer is None:
            # the engine's, too: the admin page hashes client keys with it, so its rows
            # match the traces of this observer (given, or built for the providers)
            self.engine.request_observer = observer
        # Optional (hooks.ResponseEndObserver): an outer instrumentation ends its
        # server span with the last body message, before our `end` runs.
        self._before_response_end = getattr(observer, "before_response_end", None)
        # ... unless the hook acts only on a token of `start` (telemetry's, for its span):
        # without one (no OpenTelemetry SDK set up) it is left uncalled
        self._end_hook_needs_token = bool(getattr(observer, "_end_hook_needs_token", False))
        if self.engine.route_app is None:
            self.engine.route_app = app
        clock = self.engine.clock
        # The system clock's method only calls time.monotonic: read it directly (a
        # Python frame less per read). Any other clock (FakeClock) is called as given.
        self._monotonic = time.monotonic if type(clock) is SystemClock else clock.monotonic
        self._plan_for = self.engine.plan_for
        self._plans = self.engine._plans
        store_ = self.engine.store
        # An in-process store decides without an await (None: await `admit`).
        self._admit_now = store_.admit_now
        self._read_policy()
        # A policy swapped in (`engine.policy = ...`): what was read of it here is read
        # again, as the engine drops its plans (`Engine.policy_swapped`).
        # (held here: the engine holds it weakly, so a middleware dropped goes)
        self._policy_reader = self.engine.read_policy_with(self._read_policy)
        # the records of an allowed request, built when someone reads them
        # (an attribute: compiled, a field read, not a module lookup by name)
        self._pending_builder: Callable[..., None] = admission_decisions
        self._outcomes = OutcomeRecorder(store_, self._monotonic)
        self._record_now = store_.record_now
        self._records_now = store_.record_now is not None  # an outcome recorded in process
        # Answer control refusals that escape the app (CircuitOpen, DeadlineExceeded, a
        # spent retry budget, a timeout that was the deadline) as 503/504; False: let
        # them through to the server, as any exception.
        self.answer_refusals = answer_refusals
        self._nested_said = False  # another FidelityMiddleware decided this request first
        # A clock may schedule its own timers (FakeClock does); else the event loop's.
        call_later: CallLater | None = getattr(self.engine.clock, "call_later", None)
        self._deadlines = DeadlineWatch(self._monotonic, call_later)
        self._stalls = StallWatch(self._monotonic, call_later)  # send_stall_timeout_s
        # The app's CORSMiddleware below us (inbound/cors.py): our own answers carry its
        # headers, or a browser reads a 429 of ours as a CORS failure
        cors = inner_cors(app)
        self._cors = CorsAnswers(cors) if cors is not None else None

    def _read_policy(self) -> None:
        """What the middleware reads of the engine's policy once, not per request (at
        construction, and again when a policy is swapped in)."""
        self.policy = policy = self.engine.policy
        # The engine's plans by (method, path), looked up by method, then path: no tuple
        # built, hashed and compared per request. Filled from the engine's cache alone (a
        # host-routed app's plans are never there), bounded as it is (`_plan_of`).
        self._by_method: dict[str, dict[str, RoutePlan]] = {}
        self._by_method_size = 0
        self._reader = reader = RequestReader(self.engine)
        self._wanted = reader.wanted
        self._uses_forwarding = reader.uses_forwarding
        self._limit_keys = reader.limit_keys
        self._admission = admission = Admission(
            policy, fields_for(policy.rate_limit_header_names, self.engine.clock.wall)
        )
        # the IETF fields alone (the default): called directly, a native call compiled
        self._ietf_fields = policy.rate_limit_header_names == "ietf"
        self._fields = admission.fields
        self._verdict = admission.verdict
        self._always_headers = admission.headers_mode == "always"
        self._bulkheads = Bulkheads(self.engine, reader.trusted_peer)
        # A websocket handshake on a route with rate limits is admitted by them (None:
        # the policy has none, and every websocket passes through)
        self._websockets = WebsocketGate(self) if policy.rate_limits else None

    def _plan_of(self, scope: Scope, method: str) -> RoutePlan:
        """The engine's plan for this request, kept by method and path when the engine
        keeps it by (method, path) for this root path (`__call__` looks there first)."""
        path: str = scope["path"]
        plans = self._plans
        plan = plans.get((method, path))
        if plan is None or plan.root_path != scope.get("root_path", ""):
            plan = self._plan_for(scope)
            if plans.get((method, path)) is not plan:
                return plan  # routed by host, or under another root path: the engine's
        by_method = self._by_method
        if self._by_method_size >= _MAX_PLANS:
            by_method.clear()
            self._by_method_size = 0
        paths = by_method.get(method)
        if paths is None:
            paths = by_method[method] = {}
        if path not in paths:
            self._by_method_size += 1
        paths[path] = plan
        return plan

    def _sparse_scope(
        self, scope: Scope, method: str, plan: RoutePlan | None
    ) -> tuple[RoutePlan, Iterable[tuple[bytes, bytes]]]:
        """The plan and the raw headers of a scope without `root_path` (the spec's
        default "") or without `headers` (none), as `__call__` reads them."""
        if plan is None or plan.root_path != scope.get("root_path", ""):
            plan = self._plan_of(scope, method)
        return plan, scope.get("headers") or ()

    def _say_nested(self) -> None:
        self._nested_said = True
        logger.warning(
            "fidelity_mw: a request went through two FidelityMiddleware: each keeps its own "
            "state, so its limits and breakers are counted twice. Keep one (route policies "
            "in one Policy: docs/policy.md); `fidelity-mw map` shows the stack."
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._closing_on_shutdown(send))
            elif self._websockets is not None and scope["type"] == "websocket":
                # the app, or the handshake's admission by the route's limits (websocket.py)
                await self._websockets.app_for(scope)(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        now = self._monotonic()
        try:
            method = scope["method"]
            plan = self._by_method.get(method, _NO_PLANS).get(scope["path"])
            # The scope's keys read by subscript, not `get`: interpreted a specialized
            # dict read against a method call, compiled a mapping slot call against a
            # method lookup by name (`Scope` is a MutableMapping, any mapping still
            # works). Servers set both keys; a hand-built scope may leave either out.
            try:
                # a plan is for its path under one root path (the policy's globs match the
                # path without it: engine.py); any other, and none cached, asks the engine
                if plan is None or plan.root_path != scope["root_path"]:
                    plan = self._plan_of(scope, method)
                raw_headers = scope["headers"] or ()
            except KeyError:
                plan, raw_headers = self._sparse_scope(scope, method, plan)
            if method == "OPTIONS" and is_cors_preflight(raw_headers):
                # no quota spent, none refused; the asked method's route (engine.py)
                plan = self.engine.preflight_plan_for(scope)
            # Only the headers a layer wants, repeats joined (None: none of them). One
            # scan with a set lookup per line costs less than `dict(raw_headers)` and a
            # disjointness check (that builds a dict of every header), in both builds.
            found = scan_headers(raw_headers, self._wanted)
            if INTERPRETED:  # (the class call costs an interpreter call of its own)
                ctx = new_request_context(self.engine, plan.route, method, now)
            else:
                ctx = DecisionContext(self.engine, plan.route, method, now)
        except Exception:  # never a 500 of our own making: serve the request undecided
            # one traceback per interval: a fault here hits every request while it lasts
            log_exception(
                logger, "setup", "fidelity_mw: could not set up the request; passing it through"
            )
            await self.app(scope, receive, send)
            return
        token = _set_current(ctx)
        # (`in` and a subscript, not `get`: see above. No `except KeyError` here: a
        # server without lifespan state, or httpx's ASGITransport, leaves `state` out of
        # every request, and raising costs more than the method call it saves)
        state = scope["state"] if "state" in scope else None  # noqa: SIM401
        if state is None:
            scope["state"] = {"fidelity": ctx}
        else:
            if "fidelity" in state and not self._nested_said:
                self._say_nested()
            state["fidelity"] = ctx
        observer = self.observer
        obs_token = None
        if observer is not None:
            try:
                obs_token = observer.start(ctx, scope)
            except Exception:  # telemetry must never fail a request: go on without it
                log_exception(logger, "start", "fidelity_mw: telemetry observer failed")
                observer = None
        before_end = (
            self._before_response_end
            if observer is not None and (obs_token is not None or not self._end_hook_needs_token)
            else None
        )
        slot: HeldSlot | None = None  # a slot of the route's bulkhead, while held
        app_ran = False
        try:
            # ---- decide: deadline, bulkhead, then breaker + limits in one store call
            result: InboundResult | None = None
            keys: Sequence[str] = ()
            rejection: Rejection | None = None
            try:
                remaining = plan.deadline_default_s
                if found is not None:
                    # (the method itself: compiled, a direct call with an unboxed `now`)
                    remaining, rejection = self._reader.from_headers(scope, ctx, plan, found, now)
                if rejection is None and remaining is not None:
                    ctx.deadline_at = now + remaining
                if rejection is None and plan.bulkhead is not None:
                    # Before breaker and limiter: a capacity shed costs no quota and
                    # is no breaker outcome.
                    # (a request that queued may have had its body read: `receive` replays it)
                    rejection, receive = await self._enter_bulkhead(
                        ctx, plan, scope, found, now, receive
                    )
                    if rejection is None:
                        slot = HeldSlot(self._bulkheads, ctx, plan)
                if rejection is None:
                    # The app's `send` (field by field: a class call with an __init__ costs
                    # a call of its own), made here for its `receive` too
                    watcher = ResponseWatcher()
                    watcher.send = send
                    watcher.ctx = ctx
                    if (plan.timed or plan.bulkhead is not None) and _measures_latency(plan):
                        # A route that measures its latency: the time the app waits for the
                        # client's body is the client's, not the route's (watch.ClientReceive)
                        receive = ClientReceive(receive, ctx, self._monotonic)
                    elif INTERPRETED:
                        # (the client leaving, read by the app before it answers: its
                        # answer goes to nobody, recorded `disconnected`.) A method of the
                        # watcher: one allocation, where `partial` makes three (the
                        # partial, its argument tuple, an empty keyword dict)
                        watcher.receive = receive
                        receive = watcher.gone_receive
                    else:  # (compiled: one native object, its call native too)
                        receive = GoneReceive(receive, ctx)
                    if plan.admits:
                        if plan.ip_key_prefix is not None and not self._uses_forwarding:
                            # one limit keyed by the peer address: the common case, inline
                            try:
                                client = scope["client"]  # (a subscript: see above)
                            except KeyError:
                                client = None
                            ip = client[0] if client else self._reader.no_peer(plan.limits[0].name)
                            if ":" in ip:  # IPv6: its prefix (IPv4 pays this test alone)
                                ip = self._reader.client_key(ip)
                            ctx.client_key = ip
                            # (the client's keys as its last request had them: routeplan)
                            # (`in` and a subscript: interpreted, `get` is a method call,
                            # more than the concatenation it saves)
                            keys = plan.ip_keys[ip] if ip in plan.ip_keys else ip_keys_of(plan, ip)
                        elif plan.specs:
                            keys = self._limit_keys(scope, plan, found, ctx)
                        if self._admit_now is not None:
                            result = self._admit_now(
                                plan.breaker_key, plan.breaker, keys, plan.specs, now
                            )
                        if result is None:  # no fast path, or this request needs I/O
                            result = await self.engine.store.admit(
                                plan.breaker_key, plan.breaker, keys, plan.specs, now
                            )
                        gate = result.gate
                        # Admission.verdict's allowed path, inline (a store never admits
                        # past a rejecting gate; the check keeps a custom one honest)
                        if result.admitted and (gate is None or gate.verdict != "reject"):
                            ctx._pending = (self._pending_builder, plan, result, now)
                            if plan.policy_header is not None and self._always_headers:
                                ctx.response_headers = (
                                    ratelimit_headers(plan, result)
                                    if self._ietf_fields
                                    else self._fields(plan, result)
                                )
                        else:
                            rejection = self._verdict(ctx, plan, result, now)
                    elif plan.cost_fns is None:
                        ctx._pending = (self._pending_builder, plan, None, now)
                    else:  # a limit's cost is a function of the request: inbound/costs.py
                        plan, receive, result, keys, rejection = await self._admit_costed(
                            ctx, plan, scope, receive, found, now
                        )
            except ClientDisconnect:  # gone while queued, or while a cost function read its body
                return
            except CostAnswer as answer:  # a cost function raised an HTTPException
                await self._send_answer(
                    ctx,
                    scope,
                    receive,
                    send,
                    answer,
                    before_end,
                    obs_token,
                    None if token.old_value is _MISSING else token.old_value,
                )
                return
            except Exception as exc:
                rejection = self._admission.state_failure(ctx, plan, exc, now)
                result = None
            if rejection is not None:
                await self._send_rejection(
                    ctx,
                    scope,
                    receive,
                    send,
                    rejection,
                    before_end,
                    obs_token,
                    None if token.old_value is _MISSING else token.old_value,
                )
                return

            # ---- the app, watching only the response start and its end (the watcher
            # made before the admission). Every field its messages read gets a value
            # here, None or False too: interpreted (3.11), a read that falls through to
            # the class default is never specialized, about 200 instructions against 15
            # for a store.
            ctx._token = token  # (replaced at the last message: reset with it below)
            if token.old_value is not _MISSING:  # another's context was current (nested)
                watcher.outer = token.old_value
            watcher.end = (before_end, scope, obs_token) if before_end is not None else None
            if slot is not None:  # given back at the response's last message
                slot.plan = plan  # (a cost function's plan: the same bulkhead)
                # (no local for the config: one more and the coroutine outgrows the
                # small-object allocator, tests/test_frame.py)
                if plan.concurrency is not None and plan.concurrency.send_stall_timeout_s:
                    # or sooner, with the response, when a client stops taking it
                    watcher.stall_s = plan.concurrency.send_stall_timeout_s
                    watcher.stalls = self._stalls
                else:
                    watcher.stall_s = 0.0
            else:
                watcher.stall_s = 0.0
            watcher.slot = slot
            watcher.monotonic = (
                self._monotonic
                if (plan.timed or plan.bulkhead is not None) and _measures_latency(plan)
                else None
            )
            watcher.expired = False
            if ctx.deadline_at is not None and plan.enforce:  # armed: see DeadlineWatch
                watcher.arm(self._deadlines, ctx.deadline_at, now)
            else:
                watcher.watch = None
            # (a local: interpreted, calling an instance attribute is never specialized,
            # about 115 instructions more per call; one local more than this and the
            # coroutine outgrows the small-object allocator: tests/test_frame.py)
            app = self.app
            app_ran = True
            try:
                if (
                    slot is not None
                    and plan.bulkhead is not None
                    and plan.bulkhead.spec.newest_first
                ):
                    # (while it holds arrivals, the app defers to their turn's decision)
                    await self._bulkheads.deferred(plan, app(scope, receive, watcher.__call__))
                else:
                    # (its bound method when interpreted: calling the object goes through
                    # slot_tp_call and an argument tuple per message, ~450 instructions
                    # each; the method is one allocation per request. Compiled, the
                    # object: its call is native already, and the method a lookup by
                    # name and an allocation, ~500 instructions per request.)
                    await app(scope, receive, watcher.__call__ if INTERPRETED else watcher)
            except BaseException as exc:
                watcher.disarm()
                if watcher.stalled and isinstance(exc, OSError | ClientDisconnect):
                    # We ended the response (the client took nothing for the route's
                    # send_stall_timeout_s) and the app unwound on it: no error of the
                    # app's to let out, nor for the server to log with a traceback.
                    self._after_stall(ctx, plan, result, keys, exc)
                    return
                rejection = self._refusal(ctx, watcher, exc)
                if rejection is None:
                    failed = self._upstream_failure(ctx, watcher, exc)
                    if failed is None:
                        if watcher.held is not None:  # not ours to answer: the 500 goes out
                            await watcher.release_held()
                        pending = self._outcomes.after_error(
                            ctx, plan, result, keys, exc, watcher.complete
                        )
                        if pending is not None:
                            self._outcomes.spawn(pending)  # cannot await while unwinding
                        raise
                    # answered as the app's own 5xx after the give-up, and recorded so below
                    # (through the watcher: a 500 held for the error never goes out)
                    watcher.held = None
                    try:
                        await respond(await self._cors_send(scope, watcher), failed, None)
                    except BaseException:  # the client went away: the app's error stands
                        pending = self._outcomes.after_error(ctx, plan, result, keys, exc)
                        if pending is not None:
                            self._outcomes.spawn(pending)
                        raise
            else:
                if watcher.watch is not None:
                    watcher.disarm()
                if watcher.expired:  # the app swallowed our cancellation
                    rejection = self._refusal(ctx, watcher, None)
                elif watcher.held is not None:
                    # a handler inside answered the refusal 500 and did not re-raise it
                    rejection = self._refusal(ctx, watcher, watcher.held_exc)
                    if rejection is None:
                        await watcher.release_held()
            if rejection is not None:
                await self._answer(
                    ctx,
                    scope,
                    receive,
                    watcher,
                    rejection,
                    before_end,
                    obs_token,
                    plan,
                    result,
                    keys,
                )
                return
            status = ctx.status
            if (
                watcher.complete
                and status is not None
                and status < plan.served_below
                and ctx.shed_by is None
                and not ctx.client_disconnected
                and (self._records_now or result is None or result.gate is None)
            ):
                # OutcomeRecorder.after_app's common case, inline: served, a success
                ctx.decided_by = DECIDED_BY_APP
                ctx.outcome = OUTCOME_SERVED
                gate = result.gate if result is not None else None
                # (a gate comes only from the route's breaker: key and config are set)
                if (
                    gate is not None
                    and self._record_now is not None
                    and plan.breaker_key is not None
                    and plan.breaker is not None
                ):
                    # OutcomeRecorder.record, inline. A success never opens the breaker
                    # and lands in a 3 s bucket: the start time is close enough and
                    # saves a clock read.
                    try:
                        if (
                            self._record_now(
                                plan.breaker_key, plan.breaker, gate, SUCCESS, False, now
                            )
                            is None
                        ):
                            # not in process after all (a probe's outcome: tiered, Redis)
                            state = await self._outcomes.store.record(
                                plan.breaker_key, plan.breaker, gate, SUCCESS, False, now
                            )
                            if state and state != gate.state:  # (no decision says it)
                                ctx.note_breaker(ctx.route, "route", state)
                    except Exception:
                        log_exception(
                            logger,
                            "record",
                            "fidelity_mw: could not record the outcome of %s",
                            ctx.route,
                        )
                return
            pending = self._outcomes.after_app(ctx, plan, result, keys, watcher.complete)
            if watcher.stalled:  # (the app caught SendStalled and returned)
                ctx.decided_by = LAYER_CONCURRENCY
            if pending is not None:  # a remote store: record after the response went out
                try:
                    await pending
                except Exception:
                    log_exception(
                        logger,
                        "record",
                        "fidelity_mw: could not record the outcome of %s",
                        ctx.route,
                    )
        finally:
            if slot is not None:
                slot.leave(app_ran)
            if observer is not None:
                try:
                    observer.end(ctx, scope, obs_token)
                except Exception:
                    log_exception(logger, "end", "fidelity_mw: telemetry observer failed")
            try:  # noqa: SIM105 - per request: a try costs nothing, suppress() does
                # (the watcher's, when it reset ours for the last message and set anew)
                _reset_current(ctx._token or token)
            except ValueError:  # finalised in another context (a dropped coroutine):
                pass  # the variable there was never ours to restore

    def _after_stall(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
        exc: BaseException,
    ) -> None:
        """The response was ended for a stalled client (watch.ResponseWatcher.stall): a
        disconnect for the breaker and the limits (no outcome, no refund), decided by
        the bulkhead."""
        pending = self._outcomes.after_error(ctx, plan, result, keys, exc)
        if pending is not None:
            self._outcomes.spawn(pending)
        ctx.decided_by = LAYER_CONCURRENCY

    async def _enter_bulkhead(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        scope: Scope,
        found: dict[bytes, bytes] | None,
        now: float,
        receive: Receive,
    ) -> tuple[Rejection | None, Receive]:
        """A slot of the route's bulkhead (None), or its refusal; waits in the queue when
        the bulkhead says so (ClientDisconnect: the client left meanwhile), and then the
        `receive` for the app. (Its own method: the request's coroutine stays small.)"""
        bulkheads = self._bulkheads
        priority = bulkheads.priority(plan, scope, found)
        entered = bulkheads.enter_now(ctx, plan, priority, now)
        if isinstance(entered, str):  # refused for now: wait in the queue
            return await bulkheads.wait(ctx, plan, priority, now, entered, receive, scope)
        return entered, receive

    async def _admit_costed(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        scope: Scope,
        receive: Receive,
        found: dict[bytes, bytes] | None,
        now: float,
    ) -> tuple[RoutePlan, Receive, InboundResult | None, Sequence[str], Rejection | None]:
        """Admission for a route with a cost function: the request's costs, then the
        common admission with a plan of those costs (which the refunds, fields and
        records of this request then use), and the `receive` the app gets (what the
        cost function read of the body, again)."""
        # the deadline bounds the cost functions too (a slow body, a slow lookup): armed
        # when one is awaited (a plain function never waits)
        deadline: CostDeadline | None = None
        if ctx.deadline_at is not None and plan.enforce:
            deadline = CostDeadline()
            deadline.watch = self._deadlines
            deadline.ctx = ctx
            deadline.now = now
        try:
            costs, replay = await request_costs(plan, scope, receive, deadline)
        except asyncio.CancelledError:
            watcher = deadline.watcher if deadline is not None else None
            expired = None if watcher is None else self._costs_expired(ctx, plan, watcher, now)
            if expired is None:
                raise
            return plan, receive, None, (), expired
        except ClientDisconnect:
            # the client left while a function read its body: no cost is known and
            # nobody waits for the answer; charged nothing, and the app does not run
            admission_decisions(ctx, plan, None, now)  # (the deadline's record)
            ctx.decided_by = DECIDED_BY_APP
            ctx.outcome = OUTCOME_DISCONNECTED
            ctx.client_disconnected = True
            raise
        except CostAnswer as answer:
            watcher = deadline.watcher if deadline is not None else None
            if watcher is not None and watcher.expired:  # raised for the swallowed cancel
                expired = self._costs_expired(ctx, plan, watcher, now)
                if expired is None:
                    cancel = asyncio.CancelledError()
                    cancel.__suppress_context__ = True  # (by hand: compiled, `from` is dropped)
                    raise cancel from None
                return plan, receive, None, (), expired
            # the app's own answer (a 413, a 400), as if its endpoint had raised it:
            # charged nothing and no limit asked, so no limit decision is recorded (a
            # ratelimit "reject" would count in every dashboard of limit refusals);
            # the breaker counts nothing
            admission_decisions(ctx, plan, None, now)  # (the deadline's record)
            status = answer.answer.status_code
            ctx.decided_by = DECIDED_BY_APP
            ctx.outcome = OUTCOME_SERVED if status < plan.served_below else OUTCOME_FAILED
            raise
        finally:
            if deadline is not None and deadline.watcher is not None:
                deadline.watcher.disarm()
        watcher = deadline.watcher if deadline is not None else None
        if watcher is not None and watcher.expired:  # a function swallowed the cancel
            expired = self._costs_expired(ctx, plan, watcher, now)
            if expired is None:
                raise asyncio.CancelledError
            return plan, receive, None, (), expired
        if replay is not None:
            receive = replay.replay
        records = ctx.decisions
        start = len(records)
        asked, refused = asked_costs(ctx, plan, costs, now)
        if refused is not None:
            own = records[start:]
            del records[start:]
            admission_decisions(ctx, plan, None, now)  # (the deadline's record first)
            records.extend(own)
            return plan, receive, None, (), refused
        plan = costed_plan(plan, asked)
        keys: Sequence[str] = ()
        if not plan.admits:  # no breaker, and no limit asked (each cost 0)
            ctx._pending = (costed_decisions, plan, None, now)
            return plan, receive, None, keys, None
        result = None
        try:
            if plan.specs:
                keys = self._limit_keys(scope, plan, found, ctx)
            if self._admit_now is not None:
                result = self._admit_now(plan.breaker_key, plan.breaker, keys, plan.specs, now)
            if result is None:
                result = await self.engine.store.admit(
                    plan.breaker_key, plan.breaker, keys, plan.specs, now
                )
        except Exception as exc:  # here: the app gets the body the cost function read
            return plan, receive, None, keys, self._admission.state_failure(ctx, plan, exc, now)
        start = len(ctx.decisions)
        rejection = self._verdict(ctx, plan, result, now)
        pending = ctx._pending
        if pending is not None:  # admitted: its records are built when read
            ctx._pending = (costed_decisions, *pending[1:])
        else:
            with_costs(ctx, plan, start)
        return plan, receive, result, keys, rejection

    async def _send_answer(
        self,
        ctx: DecisionContext,
        scope: Scope,
        receive: Receive,
        send: Send,
        answer: CostAnswer,
        before_end: ResponseEndHook | None,
        obs_token: Any,
        outer: DecisionContext | None,
    ) -> None:
        """Send the HTTPException a cost function raised (the app's answer, not a
        refusal of ours: no `on_reject`, no decided-by marker); its last message with
        `outer` current (responses.EndsOutside)."""
        response = answer.response()
        ctx.status = response.status_code
        if before_end is not None:
            response_ends(before_end, ctx, scope, obs_token)
        try:
            await response(scope, receive, EndsOutside(await self._cors_send(scope, send), outer))
        finally:
            ctx.response_complete = True

    def _costs_expired(
        self, ctx: DecisionContext, plan: RoutePlan, watcher: ResponseWatcher, now: float
    ) -> Rejection | None:
        """The deadline passed while the cost functions ran: 504, nothing charged. None:
        not the deadline's cancellation, or someone else's too, which stands."""
        if not watcher.expired:
            return None
        task = watcher.task
        if task is not None and task.uncancel() > 0:
            return None
        admission_decisions(ctx, plan, None, now)  # (the deadline's record first)
        return deadline_refusal(ctx, self._monotonic())

    def _refusal(
        self, ctx: DecisionContext, watcher: ResponseWatcher, exc: BaseException | None
    ) -> Rejection | None:
        """Our own answer when the app ended without a response because a control
        layer decided: the deadline passed (we cancelled it), or an outbound refusal
        escaped it. None: the app's outcome stands (and its exception propagates)."""
        if watcher.expired:
            task = watcher.task
            if task is not None and task.uncancel() > 0:
                return None  # cancelled by someone else too: that cancellation wins
            if watcher.started:
                return None
            return deadline_refusal(ctx, self._monotonic())
        if watcher.started or not self.answer_refusals or not isinstance(exc, Exception):
            return None
        return control_refusal(ctx, exc, self._monotonic())

    def _upstream_failure(
        self, ctx: DecisionContext, watcher: ResponseWatcher, exc: BaseException
    ) -> Rejection | None:
        """Our answer to an upstream's failure the app let out (an error the outbound layer
        gave up retrying, or one it did not or could not retry: refusals.upstream_failure);
        None: it propagates."""
        if watcher.started or not self.answer_refusals or not isinstance(exc, Exception):
            return None
        answered = upstream_failure(ctx, exc)
        if answered is None:
            return None
        failed, what = answered
        # once per interval and kind: an upstream outage lets one out of every request
        # (each is counted, and recorded on its request: `fidelity.upstream_exhausted`).
        # What happened in the problem's words: not every one was retried (a POST's 5xx
        # not sent again, a body broken mid-read, a Retry-After longer than the call waits)
        log_warning(
            logger,
            f"let_out:{type(exc).__name__}",
            "fidelity_mw: %s: the app let out %s: %s; answered %d",
            ctx.route,
            type(exc).__name__,
            what,
            failed[0],
        )
        return failed

    async def _send_rejection(
        self,
        ctx: DecisionContext,
        scope: Scope,
        receive: Receive,
        send: Send,
        rejection: Rejection,
        before_end: ResponseEndHook | None,
        obs_token: Any,
        outer: DecisionContext | None = None,
    ) -> None:
        """Send a refusal of ours, shaped by `on_reject` when the app gave one; its last
        message with `outer` current (responses.EndsOutside: what was current before
        the middleware made `ctx` so; the hook still sees `ctx`)."""
        if self._cors is not None:
            send = await self._cors_send(scope, send)
        custom = None
        if self._on_reject is not None:
            marker = (ctx.decided_by or "").encode("latin-1", "replace")
            custom = await custom_rejection(
                self._on_reject, ctx, rejection, ((DECIDED_BY_HEADER, marker),)
            )
        send = EndsOutside(send, outer)
        ctx.status = rejection[0] if custom is None else custom.status_code
        if before_end is not None:
            response_ends(before_end, ctx, scope, obs_token)
        try:
            if custom is None:
                await respond(send, rejection, ctx.decided_by)
            else:
                own, by = rejection, ctx.decided_by

                async def fallback(send_: Send) -> None:
                    ctx.status = own[0]  # the default goes out after all, not the hook's
                    await respond(send_, own, by)

                await send_custom(custom, fallback, scope, receive, send)
        finally:
            # The request is answered (or its client gone): a task the app spawned
            # makes calls of its own from here, as after the app's own response.
            ctx.response_complete = True

    async def _answer(
        self,
        ctx: DecisionContext,
        scope: Scope,
        receive: Receive,
        watcher: ResponseWatcher,
        rejection: Rejection,
        before_end: ResponseEndHook | None,
        obs_token: Any,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
    ) -> None:
        """Send our answer to a control decision the app did not answer itself (to the
        server's `send`, past the app's `watcher`; the last message with what was
        current before the middleware, as the watcher sends the app's)."""
        logger.debug(
            "fidelity_mw: %s answered %d for %s (%s)",
            ctx.decided_by,
            rejection[0],
            ctx.route,
            ctx.outcome,
        )
        ctx.status = rejection[0]
        pending = self._outcomes.refused(ctx, plan, result, keys)
        try:
            await self._send_rejection(
                ctx, scope, receive, watcher.send, rejection, before_end, obs_token, watcher.outer
            )
        except BaseException:
            if pending is not None:
                self._outcomes.spawn(pending)
            raise
        if pending is not None:
            try:
                await pending
            except Exception:
                log_exception(
                    logger, "record", "fidelity_mw: could not record the outcome of %s", ctx.route
                )

    async def _cors_send(self, scope: Scope, send: Send) -> Send:
        """`send` adding the headers the app's CORS layer below us would have added to
        this answer of ours (`send` itself: no such layer, not HTTP, a preflight, no
        `Origin`, or the layer failed)."""
        cors = self._cors
        if cors is None or scope.get("type") != "http":
            return send
        raw = scope.get("headers") or ()
        if scope.get("method") == "OPTIONS" and is_cors_preflight(raw):
            return send  # CORS answers preflights itself; a refused one fails anyway
        try:
            extra = await cors.headers(scope)
        except Exception:
            log_exception(logger, "cors", "fidelity_mw: the app's CORS layer failed on our answer")
            return send
        return with_headers(send, extra) if extra else send

    def _closing_on_shutdown(self, send: Send) -> Send:
        """Lifespan passes through; on shutdown the store's connections are closed first."""

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and running_loop() is None:
                # (trio): every request would fail; the server says why and stops
                logger.error("fidelity_mw: %s", NOT_ASYNCIO)
                message = {"type": "lifespan.startup.failed", "message": NOT_ASYNCIO}
            elif message["type"] == "lifespan.shutdown.complete":
                try:
                    await self.engine.aclose()
                except Exception:
                    logger.exception("fidelity_mw: could not close the state store")
            await send(message)

        return lifespan_send


def _measures_latency(plan: RoutePlan) -> bool:
    """Does the route measure its requests' latency (slow calls, an adaptive limit)?"""
    if plan.timed:
        return True
    bulkhead = plan.bulkhead
    return bulkhead is not None and bulkhead.estimate is not None
