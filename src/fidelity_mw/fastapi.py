"""FastAPI per-route forms: a rate-limit dependency, breaker and deadline decorators.

```python
from fidelity_mw.fastapi import Fidelity

fidelity = Fidelity()                     # shared by every router of the app
router = APIRouter(route_class=fidelity.route_class)

@router.get("/pay", dependencies=[Depends(fidelity.limit("10/s", key="header:x-api-key"))])
@fidelity.breaker(failure_ratio=0.25, min_calls=10)
@fidelity.deadline(2_000)
async def pay() -> dict[str, str]: ...

app = FastAPI()
app.include_router(router)
app.add_middleware(FidelityMiddleware, policy=policy)   # optional
fidelity.install(app)                     # RFC 9457 handler, OpenAPI 429/503/504
```

Behind `FidelityMiddleware` the forms share its engine and its decision
context: a limit's decision lands in the request's context (and so in its
trace) next to the middleware's, its counters live in the same store, and the
breaker / deadline overrides change the plan the middleware enforces for that
route (no second breaker on the same route). Without the middleware, the
route class enforces the route's breaker and deadline itself, on the
`Fidelity` object's own engine (`Fidelity(policy=...)`), and the limits count
there too.

A rejection raises a `Rejected` (`RateLimited` 429, `BreakerOpen` 503,
`DeadlineExpired` 504): Starlette `HTTPException`s, so an app without any setup
still answers with the right status and `Retry-After`; `install(app)` adds the
RFC 9457 body (or the `on_reject` hook's response), and an app's own handler
for any of these classes takes precedence.

Importing `fidelity_mw` never imports this module or FastAPI.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Final, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from ._types import Clock, RandomSource
from .context import (
    _CURRENT,
    ALLOW,
    LAYER_BREAKER,
    LAYER_DEADLINE,
    LAYER_RATELIMIT,
    PROBE,
    REJECT,
    SHED,
    SOURCE_REQUEST,
    WOULD_REJECT,
    Decision,
    DecisionContext,
    context_from_scope,
)
from .decide.breaker import FAILURE, IGNORED, SUCCESS, Gate
from .decide.gcra import policy_field, retry_after_header
from .engine import Engine, RoutePlan
from .errors import FidelityError
from .headers import client_address, deadline_parser
from .overrides import flat_routes, mark, override_of
from .policy import BreakerConfig, Policy, RateLimit
from .rejections import (
    PROBLEM_MEDIA_TYPE,
    OnReject,
    call_on_reject,
    keep_headers,
    problem_document,
)
from .state.base import LimitSpec, StateStore

__all__ = [
    "PROBLEM_SCHEMA",
    "BreakerOpen",
    "DeadlineExpired",
    "Fidelity",
    "LimitDependency",
    "RateLimited",
    "Rejected",
]

_F = TypeVar("_F", bound=Callable[..., Any])

logger = logging.getLogger("fidelity_mw")

_MAX_KEY_CHARS: Final = 64

PROBLEM_SCHEMA: Final[dict[str, Any]] = {
    "title": "Problem",
    "description": "RFC 9457 problem details",
    "type": "object",
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "limit": {"type": "string", "description": "the rate limit that rejected (429)"},
        "route": {"type": "string", "description": "the route whose breaker shed (503)"},
    },
    "required": ["type", "title", "status", "detail"],
}

_DESCRIPTIONS: Final = {
    429: "Rate limited: retry after `Retry-After` seconds",
    503: "Shed by the route's circuit breaker: retry after `Retry-After` seconds",
    504: "The request's deadline passed before it could be served",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for our rejections (pass to a route's `responses=`)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": _DESCRIPTIONS.get(status, "Rejected by fidelity_mw"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}},
        }
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {
                    "description": "seconds to wait before retrying",
                    "schema": {"type": "integer"},
                }
            }
        out[status] = entry
    return out


# ---------------------------------------------------------------- exceptions


class Rejected(FidelityError, HTTPException):
    """A per-route form turned the request away. Catch it with `app.exception_handler`.

    `ctx` is the request's decision context, `decision` the rejecting decision,
    `problem` the RFC 9457 document the default handler sends, `headers` the
    response fields it sends with it (`Retry-After`, `RateLimit`, ...).
    """

    def __init__(
        self,
        status_code: int,
        problem: dict[str, Any],
        headers: dict[str, str],
        ctx: DecisionContext,
        decision: Decision,
    ) -> None:
        HTTPException.__init__(self, status_code, str(problem["detail"]), headers)
        self.problem = problem
        self.ctx = ctx
        self.decision = decision


class RateLimited(Rejected):
    """429: a `Fidelity.limit` dependency's limit is exhausted for this client key."""


class BreakerOpen(Rejected):
    """503: the route's breaker sheds (raised by the route class without the middleware)."""


class DeadlineExpired(Rejected):
    """504: the request's deadline passed (raised by the route class without the middleware)."""


# ---------------------------------------------------------------- the limit dependency


KeyFunc = Callable[[Request], str | None]


class LimitDependency:
    """`Depends(fidelity.limit(...))`: one GCRA limit on this route, per client key.

    The counter is named `name` (default: the route template and the rate), so
    routes that pass the same `name` share one counter per client key.
    """

    def __init__(
        self,
        owner: Fidelity,
        rate: str,
        key: str | KeyFunc,
        burst: int | None,
        cost: int,
        name: str | None,
        shadow: bool,
    ) -> None:
        # Validated like a policy entry: a bad rate fails at import, not per request.
        checked = RateLimit(
            name=name or "depends",
            rate=rate,
            burst=burst,
            cost=cost,
            key="client_ip" if callable(key) else key,
            shadow=shadow,
        )
        self.owner = owner
        self.rate = rate
        self.key = key
        self.name = name
        self.shadow = shadow
        self.burst_size = checked.burst_size
        interval = checked.emission_interval_s
        self.interval_s = interval
        self.tolerance_s = checked.burst_size * interval
        self.cost = cost

    def __repr__(self) -> str:
        return f"<fidelity limit {self.rate} key={self.key!r} name={self.name!r}>"

    async def __call__(self, request: Request, response: Response) -> None:
        owner = self.owner
        ctx = owner.context(request)
        engine = ctx.engine
        now = engine.clock.monotonic()
        name = self.name or f"{ctx.route}:{self.rate}"
        spec = LimitSpec(name, self.interval_s, self.tolerance_s, self.cost, self.shadow)
        value = self._key_value(request, ctx)
        result = await engine.store.admit(None, None, (f"{name}|{value}",), (spec,), now)
        verdict = result.limits[0]
        source, age = result.source, result.age_s
        policy = policy_field(name, self.burst_size, self.tolerance_s)
        fields = {
            "RateLimit-Policy": policy,
            "RateLimit": f'"{name}";r={verdict.remaining};t={math.ceil(verdict.reset_s - 1e-9)}',
        }
        if verdict.allowed:
            ctx.decide(
                LAYER_RATELIMIT,
                name,
                ALLOW,
                "under_limit",
                source=source,
                age_s=age,
                at=now,
                details={"remaining": verdict.remaining},
            )
            if not self.shadow:
                for field, text in fields.items():
                    response.headers.append(field, text)
            return
        wait = round(verdict.retry_after_s, 3)
        if self.shadow:
            ctx.decide(
                LAYER_RATELIMIT,
                name,
                WOULD_REJECT,
                "over_limit_shadow",
                source=source,
                age_s=age,
                at=now,
                details={"retry_after_s": wait, "shadow": True},
            )
            return
        decision = ctx.decide(
            LAYER_RATELIMIT,
            name,
            REJECT,
            "over_limit",
            source=source,
            age_s=age,
            at=now,
            details={"retry_after_s": wait, "remaining": 0},
        )
        after = retry_after_header(verdict.retry_after_s)
        problem = problem_document(
            429,
            "Too Many Requests",
            f"rate limit {name!r} exceeded; retry in {after} s",
            "rate-limited",
            limit=name,
        )
        raise RateLimited(429, problem, {"Retry-After": after, **fields}, ctx, decision)

    def _key_value(self, request: Request, ctx: DecisionContext) -> str:
        key = self.key
        if key == "route":
            return "route:" + ctx.route
        if key == "global":
            return "*"
        if callable(key):
            custom = key(request)
            if custom is not None:
                return "k:" + _compact(str(custom))
        elif key.startswith("header:"):
            raw = request.headers.get(key[7:])
            if raw:
                return "h:" + _compact(raw)
        ip = self.owner.client_ip(request, ctx.engine)
        ctx.client_key = ip
        return ip


def _compact(value: str) -> str:
    """A huge key must not cost huge memory: long ones are hashed."""
    if len(value) <= _MAX_KEY_CHARS:
        return value
    digest = hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16)
    return "#" + digest.hexdigest()


# ---------------------------------------------------------------- Fidelity


class Fidelity:
    """The FastAPI forms of one application. Create one, share it between routers."""

    def __init__(
        self,
        app: FastAPI | None = None,
        *,
        policy: Policy | None = None,
        engine: Engine | None = None,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        store: StateStore | None = None,
        on_reject: OnReject | None = None,
    ) -> None:
        self._engine = engine
        self._engine_args: tuple[Policy | None, Clock | None, RandomSource | None] = (
            policy,
            clock,
            rng,
        )
        self._store = store
        self.on_reject = on_reject
        self.route_class: type[APIRoute] = _route_class_for(self)
        if app is not None:
            self.install(app)

    # ------------------------------------------------------------ engine and context

    @property
    def engine(self) -> Engine:
        """The engine used where no middleware provides one (created on first use)."""
        if self._engine is None:
            policy, clock, rng = self._engine_args
            self._engine = Engine(policy, clock=clock, rng=rng, store=self._store)
        return self._engine

    def context(self, request: Request) -> DecisionContext:
        """The request's decision context: the middleware's, else one of our own."""
        ctx = context_from_scope(request.scope)
        if ctx is not None:
            return ctx
        engine = self.engine
        plan = engine.plan_for(request.scope)
        ctx = DecisionContext(engine, plan.route, request.method, engine.clock.monotonic())
        state = request.scope.setdefault("state", {})
        state["fidelity"] = ctx
        return ctx

    @staticmethod
    def client_ip(request: Request, engine: Engine) -> str:
        client = request.client
        peer = client.host if client else None
        if not engine.trusted_proxies:
            return peer or "unknown"
        header = engine.policy.forwarded_header
        value = request.headers.get(header)
        return client_address(
            peer,
            value.encode("latin-1") if value is not None else None,
            engine.trusted_proxies,
            header,
        )

    # ------------------------------------------------------------ the forms

    def limit(
        self,
        rate: str,
        *,
        key: str | KeyFunc = "client_ip",
        burst: int | None = None,
        cost: int = 1,
        name: str | None = None,
        shadow: bool = False,
    ) -> LimitDependency:
        """A rate limit for `Depends(...)`: `rate` like `"10/s"`, keyed by `key`.

        `key`: `client_ip` (default), `header:<name>` (the client's IP when the
        header is missing), `route`, `global`, or a function of the request
        returning a key (None: the IP).
        """
        return LimitDependency(self, rate, key, burst, cost, name, shadow)

    def breaker(
        self, config: BreakerConfig | bool | None = None, **fields: Any
    ) -> Callable[[_F], _F]:
        """This endpoint's breaker: a `BreakerConfig`, its fields as keywords, or False (none).

        Decorate the endpoint function below the route decorator.
        """
        if config is None:
            config = BreakerConfig(**fields)
        elif fields:
            raise TypeError("pass a BreakerConfig or its fields as keywords, not both")

        def decorate(endpoint: _F) -> _F:
            return mark(endpoint, breaker=config)

        return decorate

    def deadline(self, ms: int) -> Callable[[_F], _F]:
        """This endpoint's deadline in ms: the default, and the most a caller may ask for."""
        if isinstance(ms, bool) or not isinstance(ms, int) or not 1 <= ms <= 86_400_000:
            raise ValueError(f"deadline must be 1..86400000 ms, got {ms!r}")

        def decorate(endpoint: _F) -> _F:
            return mark(endpoint, deadline_ms=ms)

        return decorate

    @staticmethod
    def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
        """OpenAPI entries for a route's `responses=` (default: 429, 503 and 504)."""
        return problem_responses(*(statuses or (429, 503, 504)))

    # ------------------------------------------------------------ the app

    def install(self, app: FastAPI) -> None:
        """RFC 9457 responses for `Rejected` (unless the app has its own handler for it),
        and 429/503/504 in the OpenAPI of every route that uses a form."""
        if Rejected not in app.exception_handlers:
            app.add_exception_handler(Rejected, self.handle_rejected)  # type: ignore[arg-type]
        generate = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                for route in flat_routes(app.routes):
                    if isinstance(getattr(route, "original_route", route), APIRoute):
                        document(route)
            return generate()

        app.openapi = openapi  # type: ignore[method-assign]

    async def handle_rejected(self, request: Request, exc: Rejected) -> Response:
        """The default handler: the `on_reject` hook's response, else RFC 9457."""
        headers = dict(exc.headers or {})
        if self.on_reject is not None:
            custom = await call_on_reject(self.on_reject, exc.ctx, exc.decision)
            if custom is not None:
                keep_headers(
                    custom,
                    [
                        (k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in headers.items()
                    ],
                )
                return custom
        headers.setdefault("Cache-Control", "no-store")
        return JSONResponse(
            exc.problem, exc.status_code, headers=headers, media_type=PROBLEM_MEDIA_TYPE
        )


# ---------------------------------------------------------------- OpenAPI


def _calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def document(route: Any, enforced: bool = False) -> None:
    """Add 429 / 503 / 504 problem responses the route can give to its OpenAPI entry.

    `route`: an APIRoute, or FastAPI's view of one inside an included router
    (its `responses` is the dict the OpenAPI generator reads)."""
    statuses: list[int] = []
    if any(isinstance(call, LimitDependency) for call in _calls(route.dependant)):
        statuses.append(429)
    override = override_of(route.endpoint)
    if enforced or (override is not None and override.breaker not in (None, False)):
        statuses.append(503)
    if enforced or (override is not None and override.deadline_ms is not None):
        statuses.append(504)
    for status, entry in problem_responses(*statuses).items():
        route.responses.setdefault(status, entry)


# ---------------------------------------------------------------- the route class


def _route_class_for(owner: Fidelity) -> type[APIRoute]:
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
    owner: Fidelity,
    request: Request,
    inner: Callable[[Request], Coroutine[Any, Any, Response]],
) -> Response:
    """Deadline and route breaker around the handler, as the middleware would do them."""
    engine = owner.engine
    plan = engine.plan_for(request.scope)
    now = engine.clock.monotonic()
    ctx = owner.context(request)
    remaining = _deadline(engine, plan, request, ctx)
    if remaining is not None:
        ctx.deadline_at = now + remaining
        if remaining <= 0.0:
            decision = ctx.decide(
                LAYER_DEADLINE,
                ctx.route,
                REJECT,
                "expired_on_arrival",
                source=SOURCE_REQUEST,
                at=now,
            )
            raise _expired(ctx, decision, "the caller's deadline had passed on arrival")
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
    if plan.breaker is not None and plan.breaker_key is not None:
        result = await engine.store.admit(plan.breaker_key, plan.breaker, (), (), now)
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
            wait = retry_after_header(gate.retry_after_s)
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
        except Exception:
            outcome = FAILURE
            raise
        outcome = _judge(plan, response.status_code)
        ctx.status = response.status_code
        return response
    finally:
        _CURRENT.reset(token)
        if gate is not None and plan.breaker is not None and plan.breaker_key is not None:
            await _record(engine, plan, gate, outcome, ctx)


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
        (now - ctx.started_at) * 1000.0 >= plan.breaker.slow_call_ms
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
        value = request.headers.get(name)
        if value is None:
            continue
        seconds = deadline_parser(name)(value.encode("latin-1"))
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
