"""Check without counting: would a request be admitted by the rate limits now?

limits' `test()`, for hints ("3 exports left", a button greyed out until a time):
the same keys, the same state and the same arithmetic as an admission
(`StateStore.peek`, `decide.gcra.peek`), and nothing charged, spent or created.
`check_limits` asks the policy's `[[rate_limit]]` entries (the middleware's);
`Depends(fidelity.limit(...))` objects have their own `check`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from starlette.requests import Request

from ..context import SOURCE_FALLBACK, SOURCE_REQUEST, DecisionContext, context_from_scope
from ..decide.gcra import LimitVerdict
from ..engine import Engine
from ..state.base import LimitSpec
from .admission import warn_without_state
from .costs import cost_of, no_body
from .request import RequestReader, scan_headers


class LimitStatus(NamedTuple):
    """One limit's answer to a check."""

    name: str
    allowed: bool
    # whole units left in the bucket now (before this request would take its cost)
    remaining: int
    retry_after_s: float  # when the request would be admitted (0.0: now)
    cost: int  # the units the request would take
    # under_limit | retry_credit | over_limit | cost_over_burst | zero_cost |
    # state_error:<exception>
    reason: str
    shadow: bool = False  # a shadow limit never refuses: `allowed` says what it measured


class LimitCheck(NamedTuple):
    """Would the request be admitted now? `allowed`: every limit that is not shadow
    admits it; `retry_after_s`: when it would be (the longest wait of those that refuse;
    infinite when one never would: a cost above its burst)."""

    allowed: bool
    retry_after_s: float
    limits: tuple[LimitStatus, ...]
    source: str  # memory | redis | cache | fallback | request (no state was read)
    age_s: float


_READERS: Final[weakref.WeakKeyDictionary[Engine, RequestReader]] = weakref.WeakKeyDictionary()


async def check_limits(
    request: Any,
    *,
    path: str | None = None,
    method: str | None = None,
    cost: int | None = None,
) -> LimitCheck:
    """Would a request like this one be admitted by the policy's rate limits now?

    `request`: a Starlette `Request` (or `WebSocket`, or an ASGI scope) that went
    through `FidelityMiddleware`; its client (IP, headers) is the one checked.
    `path` and `method`: the request to check, when it is another than this one (a
    `GET /quota` asking about `POST /api/export`). `cost`: the units it would take
    instead of each limit's `cost` (a limit's cost function is applied to `request`;
    for another route, a function that reads the body has none to read: ValueError,
    pass `cost`; a function that raises an `HTTPException` raises it here too).
    Only the rate limits are asked: the breaker, the
    bulkhead and the deadline decide when the request comes. Nothing is counted.
    """
    scope: Mapping[str, Any] = request if isinstance(request, Mapping) else request.scope
    ctx = context_from_scope(scope)
    if ctx is None:
        raise RuntimeError(
            "check_limits needs a request that went through FidelityMiddleware "
            "(the policy's [[rate_limit]] entries are the middleware's); for a "
            "Depends(fidelity.limit(...)) limit, call its check()"
        )
    engine = ctx.engine
    target = dict(scope)
    target["type"] = "http"
    router = scope.get("router")
    if "app_root_path" in scope and router is not None and _wraps(engine.route_app, router):
        # inside an app mounted in the one the middleware is on: route the request as the
        # middleware saw it (the outermost router, the root path before any Mount), not
        # as the sub-app did: the plan is cached for the middleware's requests too
        target["app"] = router
        target["root_path"] = scope["app_root_path"]
    if path is not None:
        target["path"] = path
    target["method"] = (method or scope.get("method") or "GET").upper()
    plan = engine.plan_for(target)
    reader = _READERS.get(engine)
    if reader is None:
        reader = _READERS[engine] = RequestReader(engine)
    specs = plan.specs
    if not specs:
        return LimitCheck(True, 0.0, (), SOURCE_REQUEST, 0.0)
    found = scan_headers(scope.get("headers") or (), reader.wanted)
    now = engine.clock.monotonic()
    scratch = DecisionContext(engine, plan.route, target["method"], now)
    keys = reader.limit_keys(target, plan, found, scratch)
    if cost is not None:
        specs = tuple(spec._replace(cost=cost) for spec in specs)
    elif plan.cost_fns is not None:
        # a limit's cost is a function: of `request` itself when it is the request to
        # check (the body the app read is kept on it); of another route's, a request
        # without a body (a function that reads one: ValueError, pass `cost`)
        same = path is None and (method is None or method.upper() == scope.get("method"))
        asked = request if same and isinstance(request, Request) else Request(target, no_body)
        costs = [
            lim.fixed_cost if fn is None else await cost_of(fn, asked, lim)
            for lim, fn in zip(plan.limits, plan.cost_fns, strict=True)
        ]
        specs = tuple(spec._replace(cost=c) for spec, c in zip(specs, costs, strict=True))
    bursts = [lim.burst_size for lim in plan.limits]
    return await peek_limits(engine, keys, specs, bursts, now)


def _wraps(app: object, router: object) -> bool:
    """Does the middleware's inner app (its chain of `.app`s) lead to `router`?"""
    for _ in range(32):
        if app is None:
            return False
        if app is router:
            return True
        app = getattr(app, "app", None)
    return False


async def peek_limits(
    engine: Engine,
    keys: Sequence[str],
    specs: Sequence[LimitSpec],
    bursts: Sequence[int],
    now: float,
) -> LimitCheck:
    """Ask the store about the limits a request with these costs can be admitted by at
    all (0 < cost <= burst); answer the others from the request alone."""
    for spec in specs:
        if isinstance(spec.cost, bool) or not isinstance(spec.cost, int) or spec.cost < 0:
            raise ValueError(f"a cost is a whole number of units >= 0, not {spec.cost!r}")
    asked = [i for i, spec in enumerate(specs) if 0 < spec.cost <= bursts[i]]
    verdicts: dict[int, LimitVerdict] = {}
    source, age = SOURCE_REQUEST, 0.0
    failed: str | None = None
    if asked:
        try:
            result = await engine.store.peek(
                [keys[i] for i in asked], [specs[i] for i in asked], now
            )
        except NotImplementedError:
            raise
        except Exception as exc:  # as for an admission: `state.on_error`
            warn_without_state(exc)
            failed = f"state_error:{type(exc).__name__}"
            source = SOURCE_FALLBACK
        else:
            source, age = result.source, result.age_s
            verdicts = dict(zip(asked, result.limits, strict=True))
    closed = engine.policy.state.on_error == "closed"
    statuses = []
    for i, spec in enumerate(specs):
        verdict = verdicts.get(i)
        if spec.cost == 0:
            status = LimitStatus(spec.name, True, 0, 0.0, 0, "zero_cost", spec.shadow)
        elif spec.cost > bursts[i]:
            status = LimitStatus(
                spec.name, False, 0, math.inf, spec.cost, "cost_over_burst", spec.shadow
            )
        elif verdict is None:  # the store failed: admitted unless the policy fails closed
            reason = failed or "state_error"
            wait = 1.0 if closed else 0.0  # (the Retry-After of the 503 it would get)
            status = LimitStatus(spec.name, not closed, 0, wait, spec.cost, reason, spec.shadow)
        else:
            reason = (
                "retry_credit"
                if verdict.credit
                else "under_limit"
                if verdict.allowed
                else "over_limit"
            )
            status = LimitStatus(
                spec.name,
                verdict.allowed,
                verdict.remaining,
                verdict.retry_after_s,
                spec.cost,
                reason,
                spec.shadow,
            )
        statuses.append(status)
    refusing = [s for s in statuses if not s.allowed and not s.shadow]
    wait = max((s.retry_after_s for s in refusing), default=0.0)
    return LimitCheck(not refusing, wait, tuple(statuses), source, age)
