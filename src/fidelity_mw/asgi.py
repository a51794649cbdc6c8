"""FidelityMiddleware: deadline -> route breaker -> rate limits -> app, in one pure-ASGI class.

Order and coordination (DESIGN.md): a request the deadline or the breaker
turns away never reaches the limiter, so it costs the client no quota; a
limiter rejection or a client disconnect is never counted as a breaker
failure. Websocket and lifespan scopes pass straight through; bodies stream
untouched in both directions (only the response start message gets headers
added), and `receive` is handed to the app as it is.

The allowed path is the hot path: one coroutine, one header scan, one store
call, and decisions left as facts (`ctx._pending`) that become records only
when somebody reads `ctx.decisions`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Coroutine, Sequence
from typing import Any

from starlette.requests import ClientDisconnect

from ._types import ASGIApp, Clock, Message, RandomSource, Receive, Scope, Send
from .context import (
    _CURRENT,
    ALLOW,
    LAYER_BREAKER,
    LAYER_DEADLINE,
    LAYER_RATELIMIT,
    PROBE,
    REJECT,
    SHED,
    SOURCE_FALLBACK,
    SOURCE_REQUEST,
    WOULD_REJECT,
    Decision,
    DecisionContext,
)
from .decide.breaker import FAILURE, IGNORED, SUCCESS
from .decide.gcra import retry_after_header
from .engine import Engine, RoutePlan, compact_key
from .headers import (
    client_address,
    deadline_parser,
    in_networks,
    parse_attempt,
)
from .hooks import RequestObserver
from .policy import Policy
from .state.base import InboundResult, StateStore
from .state.memory import MemoryStore

logger = logging.getLogger("fidelity_mw")

OUTCOME_SERVED = "served"
OUTCOME_FAILED = "failed"
OUTCOME_REJECTED = "rejected"
OUTCOME_SHED = "shed"
OUTCOME_EXPIRED = "expired"
OUTCOME_DISCONNECTED = "disconnected"
DECIDED_BY_APP = "app"

_ROLE_DEADLINE = 1
_ROLE_FORWARDED = 3
_ROLE_KEY = 4
_ROLE_ATTEMPT = 5

_PROBLEM = b"application/problem+json"
_EXHAUSTED = (b"x-fidelity-retry", b"exhausted")

Rejection = tuple[int, list[tuple[bytes, bytes]], bytes]


def problem_body(status: int, title: str, detail: str, kind: str, **extra: Any) -> bytes:
    """An RFC 9457 problem document."""
    body = {
        "type": f"urn:fidelity-mw:problem:{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return json.dumps(body, separators=(",", ":")).encode()


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
    ) -> None:
        self.app = app
        self.engine = engine or Engine(policy, clock=clock, rng=rng, store=store)
        self.policy = pol = self.engine.policy
        if observer is None and telemetry:
            if self.engine.request_observer is None:
                from .telemetry import default_request_observer

                self.engine.request_observer = default_request_observer(self.engine)
            observer = self.engine.request_observer
        self.observer = observer
        # Optional (hooks.ResponseEndObserver): an outer instrumentation ends its
        # server span with the last body message, before our `end` runs.
        self._before_response_end = getattr(observer, "before_response_end", None)
        if self.engine.route_app is None:
            self.engine.route_app = app
        self._monotonic = self.engine.clock.monotonic
        self._plan_for = self.engine.plan_for
        self._plans = self.engine._plans
        store_ = self.engine.store
        # Memory state needs no await: call it directly on the hot path (exactly
        # MemoryStore: a subclass may override the async methods).
        self._admit_now = store_.admit_now if type(store_) is MemoryStore else None
        self._record_now = store_.record_now if type(store_) is MemoryStore else None
        self._headers_mode = pol.rate_limit_headers
        self._use_forwarded = bool(pol.trusted_proxies)
        self._on_error = pol.state.on_error
        # (name, raw name, parser), chosen once: the hot path only calls the parser
        self._deadline_headers = tuple(
            (n, n.encode("latin-1"), deadline_parser(n)) for n in pol.deadline.header
        )
        wanted: dict[bytes, int] = {}
        for _name, raw, _parse in self._deadline_headers:
            wanted[raw] = _ROLE_DEADLINE
        self._forwarded_header = pol.forwarded_header
        self._forwarded_raw = pol.forwarded_header.encode("latin-1")
        if pol.trusted_proxies:
            wanted[self._forwarded_raw] = _ROLE_FORWARDED
        for lim in pol.rate_limits:
            if isinstance(lim.key, str) and lim.key.startswith("header:"):
                wanted[lim.key[7:].lower().encode("latin-1", "replace")] = _ROLE_KEY
        wanted[b"x-fidelity-attempt"] = _ROLE_ATTEMPT
        self._wanted = wanted
        self._peer_trust: dict[str, bool] = {}
        self._background: set[asyncio.Task[Any]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._closing_on_shutdown(send))
            else:
                await self.app(scope, receive, send)
            return
        now = self._monotonic()
        try:
            plan = self._plans.get((scope["method"], scope["path"])) or self._plan_for(scope)
            found: dict[bytes, bytes] | None = None
            repeated: dict[bytes, list[bytes]] | None = None
            wanted = self._wanted
            for name, value in scope["headers"]:
                if name in wanted:
                    if found is None:
                        found = {}
                    prior = found.get(name)
                    if prior is None:
                        found[name] = value
                    else:  # joined once at the end: appending per line is quadratic
                        if repeated is None:
                            repeated = {}
                        parts = repeated.get(name)
                        if parts is None:
                            repeated[name] = [prior, value]
                        else:
                            parts.append(value)
            if repeated is not None and found is not None:
                for name, parts in repeated.items():
                    found[name] = b",".join(parts)
            ctx = DecisionContext(self.engine, plan.route, scope["method"], now)
        except Exception:  # never a 500 of our own making: serve the request undecided
            logger.exception("fidelity_mw: could not set up the request; passing it through")
            await self.app(scope, receive, send)
            return
        token = _CURRENT.set(ctx)
        state = scope.get("state")
        if state is None:
            scope["state"] = {"fidelity": ctx}
        else:
            state["fidelity"] = ctx
        observer = self.observer
        obs_token = None
        if observer is not None:
            try:
                obs_token = observer.start(ctx, scope)
            except Exception:  # telemetry must never fail a request: go on without it
                logger.exception("fidelity_mw: telemetry observer failed")
                observer = None
        before_end = self._before_response_end if observer is not None else None
        try:
            # ---- decide: deadline, then breaker + limits in one store call
            result: InboundResult | None = None
            keys: Sequence[str] = ()
            try:
                remaining = plan.deadline_default_s
                rejection = None
                if found is not None:
                    remaining, rejection = self._from_headers(scope, ctx, plan, found, now)
                if rejection is None:
                    if remaining is not None:
                        ctx.deadline_at = now + remaining
                    if plan.breaker_key is not None or plan.specs:
                        if plan.ip_key_prefix is not None and not self._use_forwarded:
                            # one limit keyed by the peer address: the common case
                            client = scope.get("client")
                            ip = client[0] if client else "unknown"
                            ctx.client_key = ip
                            keys = (plan.ip_key_prefix + ip,)
                        elif plan.specs:
                            keys = self._limit_keys(scope, plan, found, ctx)
                        admit_now = self._admit_now
                        if admit_now is not None:
                            result = admit_now(
                                plan.breaker_key, plan.breaker, keys, plan.specs, now
                            )
                        else:
                            result = await self.engine.store.admit(
                                plan.breaker_key, plan.breaker, keys, plan.specs, now
                            )
                        rejection = self._admission(ctx, plan, result, now)
                    else:
                        ctx._pending = (_admission_decisions, plan, None, now)
            except Exception as exc:
                rejection = self._state_failure(ctx, plan, exc, now)
                result = None
            if rejection is not None:
                ctx.status = rejection[0]
                if before_end is not None:
                    self._response_ends(ctx, scope, obs_token)
                await _respond(send, *rejection)
                return

            # ---- the app, watching only the response start and its end
            extra = ctx.response_headers
            complete = False

            async def send_wrapper(message: Message) -> None:
                nonlocal complete
                kind = message["type"]
                if kind == "http.response.start":
                    status = message["status"]
                    ctx.status = status
                    headers = extra
                    if status >= 500 and ctx.upstream_exhausted:
                        headers = [*(headers or ()), _EXHAUSTED]
                    if headers:
                        # a new list: the app's may be shared (a reused Response object)
                        message["headers"] = [*message.get("headers", ()), *headers]
                elif kind == "http.response.body" and not message.get("more_body", False):
                    complete = True
                    if before_end is not None:
                        self._response_ends(ctx, scope, obs_token)
                try:
                    await send(message)
                except OSError:
                    # The server could not write to the client: a disconnect, not
                    # the route's failure (an OSError from the app's own backends is).
                    ctx.client_disconnected = True
                    raise

            try:
                await self.app(scope, receive, send_wrapper)
            except BaseException as exc:
                pending = self._after_error(ctx, plan, result, keys, exc)
                if pending is not None:
                    self._spawn(pending)  # cannot await while unwinding (maybe cancelled)
                raise
            pending = self._after_app(ctx, plan, result, keys, complete)
            if pending is not None:  # a remote store: record after the response went out
                try:
                    await pending
                except Exception:
                    logger.exception("fidelity_mw: could not record the outcome of %s", ctx.route)
        finally:
            if observer is not None:
                try:
                    observer.end(ctx, scope, obs_token)
                except Exception:
                    logger.exception("fidelity_mw: telemetry observer failed")
            _CURRENT.reset(token)

    def _closing_on_shutdown(self, send: Send) -> Send:
        """Lifespan passes through; on shutdown the store's connections are closed first."""

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                try:
                    await self.engine.aclose()
                except Exception:
                    logger.exception("fidelity_mw: could not close the state store")
            await send(message)

        return lifespan_send

    def _response_ends(self, ctx: DecisionContext, scope: Scope, obs_token: Any) -> None:
        hook = self._before_response_end
        if hook is None:
            return
        try:
            hook(ctx, scope, obs_token)
        except Exception:
            logger.exception("fidelity_mw: telemetry observer failed")

    # ------------------------------------------------------------ deadline, peers

    def _from_headers(
        self,
        scope: Scope,
        ctx: DecisionContext,
        plan: RoutePlan,
        found: dict[bytes, bytes],
        now: float,
    ) -> tuple[float | None, Rejection | None]:
        """The caller's deadline (504 if it passed) and the trusted-peer attempt header."""
        remaining = plan.deadline_default_s
        caller = None  # the shortest valid deadline among the configured headers
        for name, raw, parse in self._deadline_headers:
            value = found.get(raw)
            if value is None:
                continue
            seconds = parse(value)
            if seconds is None:
                ctx.decisions.append(
                    Decision(
                        LAYER_DEADLINE, name, ALLOW, "malformed_header", SOURCE_REQUEST, 0.0, now
                    )
                )
            elif caller is None or seconds < caller:
                caller = seconds
        if caller is not None:
            cap = plan.deadline_cap_s
            remaining = caller if cap is None or caller < cap else cap
            ctx.deadline_from_caller = True
            if remaining <= 0.0:
                ctx.deadline_at = now + remaining
                ctx.decisions.append(
                    Decision(
                        LAYER_DEADLINE,
                        ctx.route,
                        REJECT,
                        "expired_on_arrival",
                        SOURCE_REQUEST,
                        0.0,
                        now,
                    )
                )
                ctx.decided_by = LAYER_DEADLINE
                ctx.outcome = OUTCOME_EXPIRED
                body = problem_body(
                    504,
                    "Gateway Timeout",
                    "the caller's deadline had passed on arrival",
                    "deadline-expired",
                )
                return remaining, (504, [], body)
        attempt = found.get(b"x-fidelity-attempt")
        if attempt is not None:
            client = scope.get("client")
            if client and self._trusted_peer(client[0]):
                ctx.trusted_peer = True
                ctx.inbound_attempt = parse_attempt(attempt) or 1
        return remaining, None

    def _trusted_peer(self, peer: str) -> bool:
        trusted = self._peer_trust.get(peer)
        if trusted is None:
            trusted = in_networks(peer, self.engine.trusted_peers)
            if len(self._peer_trust) > 4096:
                self._peer_trust.clear()
            self._peer_trust[peer] = trusted
        return trusted

    # ------------------------------------------------------------ limiter keys

    def _limit_keys(
        self,
        scope: Scope,
        plan: RoutePlan,
        found: dict[bytes, bytes] | None,
        ctx: DecisionContext,
    ) -> list[str]:
        ip: str | None = None
        keys = []
        for lim, prefix in zip(plan.limits, plan.key_prefixes, strict=True):
            kind = lim.key
            if kind == "client_ip":
                if ip is None:
                    ip = self._client_ip(scope, found)
                value = ip
            elif kind == "route":
                value = "route:" + plan.route
            elif kind == "global":
                value = "*"
            elif isinstance(kind, str):  # header:NAME; a missing header falls back to the IP
                raw = found.get(kind[7:].lower().encode("latin-1", "replace")) if found else None
                if raw:
                    value = "h:" + compact_key(raw.decode("latin-1"))
                else:
                    if ip is None:
                        ip = self._client_ip(scope, found)
                    value = ip
            else:
                try:
                    custom = kind(scope)
                except Exception:
                    logger.exception("fidelity_mw: key function of %r failed", lim.name)
                    custom = None
                if custom is None:
                    if ip is None:
                        ip = self._client_ip(scope, found)
                    value = ip
                else:
                    value = "k:" + compact_key(str(custom))
            keys.append(prefix + value)
        if ip is not None:
            ctx.client_key = ip
        return keys

    def _client_ip(self, scope: Scope, found: dict[bytes, bytes] | None) -> str:
        client = scope.get("client")
        peer: str | None = client[0] if client else None
        if found is None or not self.engine.trusted_proxies:
            return peer if peer is not None else "unknown"
        return client_address(
            peer,
            found.get(self._forwarded_raw),
            self.engine.trusted_proxies,
            self._forwarded_header,
        )

    # ------------------------------------------------------------ breaker + limiter verdicts

    def _admission(
        self, ctx: DecisionContext, plan: RoutePlan, result: InboundResult, now: float
    ) -> Rejection | None:
        """Turn the store's answer into a response (if rejected) and decision facts."""
        gate = result.gate
        if gate is not None and gate.verdict == "reject":
            _admission_decisions(ctx, plan, result, now)
            ctx.decided_by = LAYER_BREAKER
            ctx.outcome = OUTCOME_SHED
            wait = retry_after_header(gate.retry_after_s)
            body = problem_body(
                503,
                "Service Unavailable",
                f"the circuit breaker of route {plan.route!r} is "
                f"{gate.state.replace('_', '-')}; retry in {wait} s",
                "circuit-open",
                route=plan.route,
            )
            return 503, [(b"retry-after", wait.encode())], body
        if result.admitted:
            ctx._pending = (_admission_decisions, plan, result, now)
            if plan.policy_header is not None and self._headers_mode == "always":
                ctx.response_headers = _ratelimit_headers(plan, result)
            return None
        _admission_decisions(ctx, plan, result, now)
        worst = -1
        worst_wait = -1.0
        for i, verdict in enumerate(result.limits):
            blocking = not verdict.allowed and not plan.specs[i].shadow
            if blocking and verdict.retry_after_s > worst_wait:
                worst, worst_wait = i, verdict.retry_after_s
        ctx.decided_by = LAYER_RATELIMIT
        ctx.outcome = OUTCOME_REJECTED
        name = plan.specs[worst].name
        wait = retry_after_header(worst_wait)
        headers = [(b"retry-after", wait.encode())]
        if self._headers_mode != "never" and plan.policy_header is not None:
            headers.extend(_ratelimit_headers(plan, result))
        body = problem_body(
            429,
            "Too Many Requests",
            f"rate limit {name!r} exceeded; retry in {wait} s",
            "rate-limited",
            limit=name,
        )
        return 429, headers, body

    def _state_failure(
        self, ctx: DecisionContext, plan: RoutePlan, exc: Exception, now: float
    ) -> Rejection | None:
        """The store (or our own code) failed: decide per `state.on_error`."""
        logger.warning("fidelity_mw: deciding without state (%s: %s)", type(exc).__name__, exc)
        closed = self._on_error == "closed"
        layer = LAYER_BREAKER if plan.breaker_key is not None else LAYER_RATELIMIT
        ctx._pending = None
        _admission_decisions(ctx, plan, None, now)
        ctx.decisions.append(
            Decision(
                layer,
                plan.route,
                REJECT if closed else ALLOW,
                f"state_error:{type(exc).__name__}",
                SOURCE_FALLBACK,
                0.0,
                now,
                {"on_error": self._on_error},
            )
        )
        if not closed:
            return None
        ctx.decided_by = layer
        ctx.outcome = OUTCOME_SHED
        body = problem_body(
            503,
            "Service Unavailable",
            "the control state is unreachable and the policy says to fail closed",
            "state-unavailable",
        )
        return 503, [(b"retry-after", b"1")], body

    # ------------------------------------------------------------ after the app

    def _after_error(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
        exc: BaseException,
    ) -> Coroutine[Any, Any, Any] | None:
        ctx.decided_by = DECIDED_BY_APP
        if ctx.client_disconnected or isinstance(exc, asyncio.CancelledError | ClientDisconnect):
            ctx.outcome = OUTCOME_DISCONNECTED
            ctx.client_disconnected = True
            outcome = IGNORED
        elif ctx.shed_by is not None and isinstance(exc, Exception):
            # e.g. CircuitOpen left uncaught: the 500 is the outbound layer's decision
            return self._shed_downstream(ctx, plan, result, keys)
        elif isinstance(exc, Exception):
            ctx.outcome = OUTCOME_FAILED
            outcome = FAILURE
        else:  # KeyboardInterrupt, SystemExit: not the route's fault
            outcome = IGNORED
        return self._finish(ctx, plan, result, outcome)

    def _after_app(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
        complete: bool,
    ) -> Coroutine[Any, Any, Any] | None:
        ctx.decided_by = DECIDED_BY_APP
        status = ctx.status
        breaker = plan.breaker
        if status is not None and not complete:
            # The app stopped mid-response without an error: the client went away
            # (Starlette's streaming responses end quietly on http.disconnect).
            ctx.outcome = OUTCOME_DISCONNECTED
            ctx.client_disconnected = True
            outcome = IGNORED
        elif ctx.shed_by is not None and (status is None or status >= 500):
            return self._shed_downstream(ctx, plan, result, keys)
        elif status is None or (breaker is not None and status in breaker.failure_statuses):
            ctx.outcome = OUTCOME_FAILED
            outcome = FAILURE
        else:
            ctx.outcome = OUTCOME_SERVED if status < 500 else OUTCOME_FAILED
            outcome = SUCCESS
        gate = result.gate if result is not None else None
        if breaker is None or gate is None or plan.breaker_key is None:
            return None
        if breaker.slow_call_ms is None and outcome == SUCCESS and self._record_now is not None:
            # A success never opens the breaker and lands in a 3 s bucket: the
            # start time is close enough and saves a clock read per request.
            try:
                self._record_now(plan.breaker_key, breaker, gate, outcome, False, ctx.started_at)
            except Exception:
                logger.exception("fidelity_mw: could not record the outcome of %s", ctx.route)
            return None
        return self._finish(ctx, plan, result, outcome)

    def _shed_downstream(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
    ) -> Coroutine[Any, Any, Any] | None:
        """An outbound control layer refused the app's upstream call before sending it,
        and the app answered with an error. That layer decided: the route breaker does
        not count it (no second breaker on the same evidence) and the limits get their
        units back (a request rejected by one layer consumes no quota of another)."""
        ctx.decided_by = ctx.shed_by
        ctx.outcome = OUTCOME_SHED
        pending = self._finish(ctx, plan, result, IGNORED)  # frees a probe slot, if any
        if result is None or not result.admitted or not keys:
            return pending
        charged = [i for i, verdict in enumerate(result.limits) if verdict.allowed]
        charged_keys = [keys[i] for i in charged]
        charged_specs = [plan.specs[i] for i in charged]
        now = self._monotonic()
        if type(self.engine.store) is MemoryStore:
            self.engine.store.refund_now(charged_keys, charged_specs, now)
            return pending
        refund = self.engine.store.refund(charged_keys, charged_specs, result.source, now)
        return _in_order(pending, refund)

    def _finish(
        self, ctx: DecisionContext, plan: RoutePlan, result: InboundResult | None, outcome: str
    ) -> Coroutine[Any, Any, str] | None:
        """Report the outcome to the breaker: done at once for memory, else a coroutine."""
        breaker = plan.breaker
        gate = result.gate if result is not None else None
        if gate is None or breaker is None or plan.breaker_key is None:
            return None
        now = self._monotonic()
        slow = breaker.slow_call_ms is not None and (
            (now - ctx.started_at) * 1000.0 >= breaker.slow_call_ms
        )
        record_now = self._record_now
        if record_now is None:
            return self.engine.store.record(plan.breaker_key, breaker, gate, outcome, slow, now)
        try:
            record_now(plan.breaker_key, breaker, gate, outcome, slow, now)
        except Exception:
            logger.exception("fidelity_mw: could not record the outcome of %s", ctx.route)
        return None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Record to a remote store without holding up the unwinding request."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _admission_decisions(
    ctx: DecisionContext, plan: RoutePlan, result: InboundResult | None, now: float
) -> None:
    """Build the deadline, breaker and limiter decision records from the facts."""
    append = ctx._decisions.append
    if ctx.deadline_at is not None:
        remaining = ctx.deadline_at - now
        append(
            Decision(
                LAYER_DEADLINE,
                ctx.route,
                ALLOW,
                "caller_deadline" if ctx.deadline_from_caller else "route_default",
                SOURCE_REQUEST,
                0.0,
                now,
                {"remaining_ms": round(remaining * 1000.0, 3)},
            )
        )
    if result is None:
        return
    source, age = result.source, result.age_s
    gate = result.gate
    if gate is not None:
        if gate.verdict == "reject":
            append(
                Decision(
                    LAYER_BREAKER,
                    plan.route,
                    SHED,
                    f"breaker_{gate.state}",
                    source,
                    age,
                    now,
                    {"retry_after_s": round(gate.retry_after_s, 3)},
                )
            )
            return
        probe = gate.verdict == "probe"
        append(
            Decision(
                LAYER_BREAKER,
                plan.route,
                PROBE if probe else ALLOW,
                "half_open_probe" if probe else "breaker_closed",
                source,
                age,
                now,
            )
        )
    for spec, verdict in zip(plan.specs, result.limits, strict=False):
        if verdict.allowed:
            append(
                Decision(
                    LAYER_RATELIMIT,
                    spec.name,
                    ALLOW,
                    "under_limit",
                    source,
                    age,
                    now,
                    {"remaining": verdict.remaining},
                )
            )
        elif spec.shadow:
            append(
                Decision(
                    LAYER_RATELIMIT,
                    spec.name,
                    WOULD_REJECT,
                    "over_limit_shadow",
                    source,
                    age,
                    now,
                    {"retry_after_s": round(verdict.retry_after_s, 3), "shadow": True},
                )
            )
        else:
            append(
                Decision(
                    LAYER_RATELIMIT,
                    spec.name,
                    REJECT,
                    "over_limit",
                    source,
                    age,
                    now,
                    {"retry_after_s": round(verdict.retry_after_s, 3), "remaining": 0},
                )
            )


def _ratelimit_headers(plan: RoutePlan, result: InboundResult) -> list[tuple[bytes, bytes]]:
    """RateLimit-Policy (static per route) and RateLimit (remaining; seconds to reset)."""
    prefixes = plan.remaining_prefixes
    limits = result.limits
    # The slack absorbs float noise: a reset of exactly 10 s must not read 11.
    if len(limits) == 1 and prefixes[0] is not None:
        verdict = limits[0]
        value = prefixes[0] + b"%d;t=%d" % (verdict.remaining, math.ceil(verdict.reset_s - 1e-9))
    else:  # shadow limits (prefix None) are not advertised: they are never enforced
        value = b", ".join(
            prefix + b"%d;t=%d" % (verdict.remaining, math.ceil(verdict.reset_s - 1e-9))
            for prefix, verdict in zip(prefixes, limits, strict=True)
            if prefix is not None
        )
    return [(b"ratelimit-policy", plan.policy_header or b""), (b"ratelimit", value)]


async def _in_order(*steps: Coroutine[Any, Any, Any] | None) -> None:
    for step in steps:
        if step is not None:
            await step


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", _PROBLEM),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
