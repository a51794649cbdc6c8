"""FidelityMiddleware: deadline -> route breaker -> rate limits -> app, in one pure-ASGI class.

Order and coordination (DESIGN.md): a request the deadline or the breaker
turns away never reaches the limiter, so it costs the client no quota; a
limiter rejection or a client disconnect is never counted as a breaker
failure. Websocket and lifespan scopes pass straight through; response
bodies stream untouched (only the start message gets headers added).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Any

from starlette.requests import ClientDisconnect

from ._types import ASGIApp, Clock, Message, RandomSource, Receive, Scope, Send
from .breaker import FAILURE, IGNORED, SUCCESS, Gate
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
from .engine import Engine, RoutePlan, compact_key
from .headers import client_address, in_networks, parse_attempt, parse_deadline
from .hooks import RequestObserver
from .policy import Policy
from .ratelimit import limit_field, retry_after_header
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
_ROLE_XFF = 2
_ROLE_FORWARDED = 3
_ROLE_KEY = 4
_ROLE_ATTEMPT = 5

_PROBLEM = b"application/problem+json"


def problem_body(status: int, title: str, detail: str, kind: str, **extra: Any) -> bytes:
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
        self.policy = self.engine.policy
        if observer is None and telemetry:
            if self.engine.request_observer is None:
                from .telemetry import default_request_observer

                self.engine.request_observer = default_request_observer(self.engine)
            observer = self.engine.request_observer
        self.observer = observer
        store_ = self.engine.store
        # Memory state needs no await: call it directly on the hot path.
        self._admit_now = store_.admit_now if isinstance(store_, MemoryStore) else None
        self._record_now = store_.record_now if isinstance(store_, MemoryStore) else None
        pol = self.policy
        self._headers_mode = pol.rate_limit_headers
        self._on_error = pol.state.on_error
        wanted: dict[bytes, int] = {}
        for name in pol.deadline.header:
            wanted[name.encode("latin-1")] = _ROLE_DEADLINE
        if pol.trusted_proxies:
            wanted[b"x-forwarded-for"] = _ROLE_XFF
            wanted[b"forwarded"] = _ROLE_FORWARDED
        for lim in pol.rate_limits:
            if isinstance(lim.key, str) and lim.key.startswith("header:"):
                wanted[lim.key[7:].lower().encode("latin-1")] = _ROLE_KEY
        wanted[b"x-fidelity-attempt"] = _ROLE_ATTEMPT
        self._wanted = wanted
        self._peer_trust: dict[str, bool] = {}
        self._background: set[asyncio.Task[Any]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        engine = self.engine
        clock = engine.clock
        now = clock.monotonic()
        try:
            plan = engine.plan_for(scope)
            found: dict[bytes, bytes] | None = None
            wanted = self._wanted
            for name, value in scope["headers"]:
                if name in wanted:
                    if found is None:
                        found = {}
                    prior = found.get(name)
                    found[name] = value if prior is None else prior + b"," + value
            client = scope.get("client")
            peer: str | None = client[0] if client else None
            ctx = DecisionContext(
                engine=engine,
                route=plan.route,
                method=scope.get("method", "GET"),
                started_at=now,
            )
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
        obs_token = observer.start(ctx, scope) if observer is not None else None
        try:
            await self._handle(scope, receive, send, ctx, plan, found, peer, now)
        finally:
            if observer is not None:
                try:
                    observer.end(ctx, scope, obs_token)
                except Exception:
                    logger.exception("fidelity_mw: telemetry observer failed")
            _CURRENT.reset(token)

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: DecisionContext,
        plan: RoutePlan,
        found: dict[bytes, bytes] | None,
        peer: str | None,
        now: float,
    ) -> None:
        engine = self.engine
        result: InboundResult | None = None
        try:
            # --- deadline
            remaining = self._deadline(ctx, plan, found, now)
            if remaining is not None:
                ctx.deadline_at = now + remaining
                if remaining <= 0.0:
                    ctx.decided_by = LAYER_DEADLINE
                    ctx.outcome = OUTCOME_EXPIRED
                    await _respond(
                        send,
                        504,
                        [],
                        problem_body(
                            504,
                            "Gateway Timeout",
                            "the caller's deadline had passed on arrival",
                            "deadline-expired",
                        ),
                    )
                    return
            if found is not None and peer is not None:
                attempt = found.get(b"x-fidelity-attempt")
                if attempt is not None and self._trusted_peer(peer):
                    ctx.trusted_peer = True
                    ctx.inbound_attempt = parse_attempt(attempt) or 1
            # --- breaker + rate limits, one atomic store call
            if plan.breaker_key is not None or plan.specs:
                keys = self._limit_keys(scope, plan, found, peer, ctx) if plan.specs else ()
                admit_now = self._admit_now
                if admit_now is not None:
                    result = admit_now(plan.breaker_key, plan.breaker, keys, plan.specs, now)
                else:
                    result = await engine.store.admit(
                        plan.breaker_key, plan.breaker, keys, plan.specs, now
                    )
                rejection = self._record_admission(ctx, plan, result, now)
                if rejection is not None:
                    await _respond(send, *rejection)
                    return
        except Exception as exc:
            if self._state_failure(ctx, plan, exc, now):
                await _respond(
                    send,
                    503,
                    [(b"retry-after", b"1")],
                    problem_body(
                        503,
                        "Service Unavailable",
                        "the control state is unreachable and the policy says to fail closed",
                        "state-unavailable",
                    ),
                )
                return
            result = None
        await self._call_app(scope, receive, send, ctx, plan, result, now)

    # ------------------------------------------------------------ layers

    def _deadline(
        self, ctx: DecisionContext, plan: RoutePlan, found: dict[bytes, bytes] | None, now: float
    ) -> float | None:
        remaining = None
        if found is not None:
            for name in self.policy.deadline.header:
                value = found.get(name.encode("latin-1"))
                if value is None:
                    continue
                seconds = parse_deadline(name, value)
                if seconds is None:
                    ctx.decisions.append(
                        Decision(
                            LAYER_DEADLINE,
                            name,
                            ALLOW,
                            "malformed_header",
                            SOURCE_REQUEST,
                            0.0,
                            now,
                        )
                    )
                    continue
                if remaining is None or seconds < remaining:
                    remaining = seconds
        if remaining is None:
            return plan.deadline_default_s
        cap = plan.deadline_cap_s
        if cap is not None and remaining > cap:
            remaining = cap
        if remaining <= 0.0:
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
        else:
            ctx.decisions.append(
                Decision(
                    LAYER_DEADLINE,
                    ctx.route,
                    ALLOW,
                    "caller_deadline",
                    SOURCE_REQUEST,
                    0.0,
                    now,
                    {"remaining_ms": round(remaining * 1000.0, 3)},
                )
            )
        return remaining

    def _trusted_peer(self, peer: str) -> bool:
        trusted = self._peer_trust.get(peer)
        if trusted is None:
            trusted = in_networks(peer, self.engine.trusted_peers)
            if len(self._peer_trust) > 4096:
                self._peer_trust.clear()
            self._peer_trust[peer] = trusted
        return trusted

    def _limit_keys(
        self,
        scope: Scope,
        plan: RoutePlan,
        found: dict[bytes, bytes] | None,
        peer: str | None,
        ctx: DecisionContext,
    ) -> list[str]:
        ip: str | None = None
        keys = []
        for lim in plan.limits:
            kind = lim.key
            if kind == "client_ip":
                if ip is None:
                    ip = self._client_ip(peer, found)
                value = ip
            elif kind == "route":
                value = "route:" + plan.route
            elif kind == "global":
                value = "*"
            elif isinstance(kind, str):  # header:NAME; a missing header falls back to the IP
                raw = found.get(kind[7:].lower().encode("latin-1")) if found else None
                if raw:
                    value = "h:" + compact_key(raw.decode("latin-1"))
                else:
                    if ip is None:
                        ip = self._client_ip(peer, found)
                    value = ip
            else:
                try:
                    custom = kind(scope)
                except Exception:
                    logger.exception("fidelity_mw: key function of %r failed", lim.name)
                    custom = None
                if custom is None:
                    if ip is None:
                        ip = self._client_ip(peer, found)
                    value = ip
                else:
                    value = "k:" + compact_key(custom)
            keys.append(lim.name + "|" + value)
        if ip is not None:
            ctx.client_key = ip
        return keys

    def _client_ip(self, peer: str | None, found: dict[bytes, bytes] | None) -> str:
        if found is None or not self.engine.trusted_proxies:
            return peer or "unknown"
        return client_address(
            peer,
            found.get(b"x-forwarded-for"),
            found.get(b"forwarded"),
            self.engine.trusted_proxies,
        )

    def _record_admission(
        self, ctx: DecisionContext, plan: RoutePlan, result: InboundResult, now: float
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """Append the breaker and limiter decisions; return a response if rejected."""
        source, age = result.source, result.age_s
        decisions = ctx.decisions
        gate = result.gate
        if gate is not None:
            if gate.verdict == "reject":
                decisions.append(
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
                ctx.decided_by = LAYER_BREAKER
                ctx.outcome = OUTCOME_SHED
                wait = retry_after_header(gate.retry_after_s)
                return (
                    503,
                    [(b"retry-after", wait.encode())],
                    problem_body(
                        503,
                        "Service Unavailable",
                        f"the circuit breaker of route {plan.route!r} is "
                        f"{gate.state.replace('_', '-')}; "
                        f"retry in {wait} s",
                        "circuit-open",
                        route=plan.route,
                    ),
                )
            decisions.append(
                Decision(
                    LAYER_BREAKER,
                    plan.route,
                    PROBE if gate.verdict == "probe" else ALLOW,
                    "half_open_probe" if gate.verdict == "probe" else "breaker_closed",
                    source,
                    age,
                    now,
                )
            )
        if not result.limits:
            return None
        worst = -1
        worst_wait = -1.0
        for i, (spec, verdict) in enumerate(zip(plan.specs, result.limits, strict=True)):
            if verdict.allowed:
                decisions.append(
                    Decision(
                        LAYER_RATELIMIT,
                        spec.name,
                        ALLOW,
                        "under_limit",
                        source,
                        age,
                        now,
                    )
                )
                continue
            if spec.shadow:
                decisions.append(
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
                continue
            decisions.append(
                Decision(
                    LAYER_RATELIMIT,
                    spec.name,
                    REJECT,
                    "over_limit",
                    source,
                    age,
                    now,
                    {
                        "retry_after_s": round(verdict.retry_after_s, 3),
                        "remaining": verdict.remaining,
                    },
                )
            )
            if verdict.retry_after_s > worst_wait:
                worst, worst_wait = i, verdict.retry_after_s
        headers = self._ratelimit_headers(plan, result, rejected=not result.admitted)
        if result.admitted:
            ctx.response_headers = headers or None
            return None
        ctx.decided_by = LAYER_RATELIMIT
        ctx.outcome = OUTCOME_REJECTED
        name = plan.specs[worst].name
        wait = retry_after_header(worst_wait)
        return (
            429,
            [(b"retry-after", wait.encode()), *headers],
            problem_body(
                429,
                "Too Many Requests",
                f"rate limit {name!r} exceeded; retry in {wait} s",
                "rate-limited",
                limit=name,
            ),
        )

    def _ratelimit_headers(
        self, plan: RoutePlan, result: InboundResult, *, rejected: bool
    ) -> list[tuple[bytes, bytes]]:
        mode = self._headers_mode
        if mode == "never" or (mode == "on_reject" and not rejected) or plan.policy_header is None:
            return []
        items = ", ".join(
            limit_field(spec.name, verdict.remaining, verdict.reset_s)
            for spec, verdict in zip(plan.specs, result.limits, strict=True)
        )
        return [(b"ratelimit-policy", plan.policy_header), (b"ratelimit", items.encode("latin-1"))]

    def _state_failure(
        self, ctx: DecisionContext, plan: RoutePlan, exc: Exception, now: float
    ) -> bool:
        """The store (or our own code) failed: decide per `state.on_error`. True = reject."""
        logger.warning("fidelity_mw: deciding without state (%s: %s)", type(exc).__name__, exc)
        closed = self._on_error == "closed"
        layer = LAYER_BREAKER if plan.breaker_key is not None else LAYER_RATELIMIT
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
        if closed:
            ctx.decided_by = layer
            ctx.outcome = OUTCOME_SHED
        return closed

    # ------------------------------------------------------------ the app

    async def _call_app(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: DecisionContext,
        plan: RoutePlan,
        result: InboundResult | None,
        now: float,
    ) -> None:
        extra = ctx.response_headers
        complete = False

        async def send_wrapper(message: Message) -> None:
            nonlocal complete
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                ctx.status = status
                headers = extra
                if ctx.upstream_exhausted and status >= 500:
                    headers = [*(headers or ()), (b"x-fidelity-retry", b"exhausted")]
                if headers:
                    message = {**message, "headers": [*message.get("headers", ()), *headers]}
            elif kind == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                ctx.client_disconnected = True
            return message

        gate = result.gate if result is not None else None
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError | ClientDisconnect | OSError) or (
                ctx.client_disconnected
            ):
                ctx.outcome = OUTCOME_DISCONNECTED
                pending = self._finish(ctx, plan, gate, IGNORED)
            elif isinstance(exc, Exception):
                ctx.outcome = OUTCOME_FAILED
                pending = self._finish(ctx, plan, gate, FAILURE)
            else:
                pending = self._finish(ctx, plan, gate, IGNORED)
            ctx.decided_by = DECIDED_BY_APP
            if pending is not None:
                self._spawn(pending)  # cannot await while unwinding (maybe cancelled)
            raise
        ctx.decided_by = DECIDED_BY_APP
        status = ctx.status
        if ctx.client_disconnected and not complete:
            ctx.outcome = OUTCOME_DISCONNECTED
            outcome = IGNORED
        elif status is None or (
            plan.breaker is not None and status in plan.breaker.failure_statuses
        ):
            ctx.outcome = OUTCOME_FAILED
            outcome = FAILURE
        else:
            ctx.outcome = OUTCOME_SERVED if status < 500 else OUTCOME_FAILED
            outcome = SUCCESS
        pending = self._finish(ctx, plan, gate, outcome)
        if pending is not None:
            try:
                await pending
            except Exception:
                logger.exception("fidelity_mw: could not record the outcome of %s", ctx.route)

    def _finish(
        self, ctx: DecisionContext, plan: RoutePlan, gate: Gate | None, outcome: str
    ) -> Coroutine[Any, Any, str] | None:
        """Report the outcome to the breaker: done at once for memory, else a coroutine."""
        breaker = plan.breaker
        if gate is None or breaker is None or plan.breaker_key is None:
            return None
        engine = self.engine
        now = engine.clock.monotonic()
        slow = breaker.slow_call_ms is not None and (now - ctx.started_at) * 1000.0 >= (
            breaker.slow_call_ms
        )
        record_now = self._record_now
        if record_now is None:
            return engine.store.record(plan.breaker_key, breaker, gate, outcome, slow, now)
        try:
            record_now(plan.breaker_key, breaker, gate, outcome, slow, now)
        except Exception:
            logger.exception("fidelity_mw: could not record the outcome of %s", ctx.route)
        return None

    def _spawn(self, coro: Any) -> None:
        """Record to a remote store without holding up the response."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


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
