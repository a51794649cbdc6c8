"""The `X-RateLimit-*` fields that slowapi, GitHub and many API clients read.

Opt-in (`rate_limit_header_names = "x-ratelimit"` or `"both"`): the IETF
`RateLimit` / `RateLimit-Policy` fields say the same for every limit at once,
but a client written against `X-RateLimit-Remaining` cannot read them. These
carry one limit, the one closest to refusing (fewest units left; on a tie the
later `t`): its bucket size, its whole units left and, as slowapi and GitHub
do, the Unix time in seconds at which more quota is available (on a 429: when
the request would be admitted, never after its `Retry-After`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..context import LAYER_RATELIMIT, DecisionContext
from ..decide.specs import LimitSpec
from ..routeplan import RoutePlan
from ..state.base import InboundResult
from .admission import FieldsFn, admission_decisions, quota_wait_s, ratelimit_headers
from .costs import costed_decisions
from .refusals import charged_for_upstream

Fields = list[tuple[bytes, bytes]]


def closest_limit(
    plan: RoutePlan, result: InboundResult, retry_after: int | None
) -> tuple[LimitSpec, int, float] | None:
    """The advertised limit with the fewest units left: (its spec, r, seconds until
    more quota, at most `retry_after`)."""
    best: tuple[LimitSpec, int, float] | None = None
    for prefix, spec, verdict in zip(
        plan.remaining_prefixes, plan.specs, result.limits, strict=True
    ):
        if prefix is None:  # shadow limits are never advertised
            continue
        wait = quota_wait_s(verdict, spec)
        if retry_after is not None and wait > retry_after:
            wait = retry_after
        if best is None or (verdict.remaining, -wait) < (best[1], -best[2]):
            best = (spec, verdict.remaining, wait)
    return best


def x_ratelimit_fields(spec: LimitSpec, remaining: int, wait_s: float, wall_now: float) -> Fields:
    """The three fields of one limit; `wall_now` is the Unix time now. The reset is
    rounded up once, from the exact wait: never before more quota is there."""
    bucket = round(spec.tolerance_s / spec.interval_s)
    return [
        (b"x-ratelimit-limit", b"%d" % bucket),
        (b"x-ratelimit-remaining", b"%d" % remaining),
        (b"x-ratelimit-reset", b"%d" % math.ceil(wall_now + wait_s - 1e-9)),
    ]


def x_ratelimit_headers(
    plan: RoutePlan, result: InboundResult, wall_now: float, retry_after: int | None = None
) -> Fields:
    closest = closest_limit(plan, result, retry_after)
    return [] if closest is None else x_ratelimit_fields(*closest, wall_now)


def fields_for(names: str, wall: Callable[[], float]) -> FieldsFn:
    """The rate-limit fields a response carries, by `rate_limit_header_names`."""
    if names == "ietf":
        return ratelimit_headers

    def x_only(plan: RoutePlan, result: InboundResult, retry_after: int | None = None) -> Fields:
        return x_ratelimit_headers(plan, result, wall(), retry_after)

    if names == "x-ratelimit":
        return x_only

    def both(plan: RoutePlan, result: InboundResult, retry_after: int | None = None) -> Fields:
        return ratelimit_headers(plan, result, retry_after) + x_only(plan, result, retry_after)

    return both


def refunded_fields(ctx: DecisionContext, headers: Fields) -> Fields:
    """The middleware's rate-limit fields for a request another layer refused inside the
    app (`ctx.shed_by`: a `Depends(limit)` 429, an outbound refusal answered with an
    error): as its limits stand once they get their units back (watch.py's
    `shed_downstream`), not as the admission charged them, which read one request low.
    `headers` as they are when the admission's facts are gone (a builder of its own)."""
    if ctx.shed_by != LAYER_RATELIMIT and charged_for_upstream(ctx):
        return headers  # its units stay spent: the refusal was of a host the client chose
    facts = ctx._pending if ctx._pending is not None else ctx._built
    # (a request of a route with a cost function: inbound/costs.py)
    if facts is None or (facts[0] is not admission_decisions and facts[0] is not costed_decisions):
        return headers
    plan: RoutePlan = facts[1]
    result: InboundResult | None = facts[2]
    if result is None or not result.admitted:
        return headers
    limits = []
    for spec, verdict in zip(plan.specs, result.limits, strict=True):
        if verdict.allowed and not verdict.credit:
            # (admitted from retry credit, the bucket was left as it was: so it stays)
            burst = round(spec.tolerance_s / spec.interval_s)
            given = spec.cost * spec.interval_s
            verdict = verdict._replace(
                remaining=min(burst, verdict.remaining + spec.cost),
                reset_s=max(0.0, verdict.reset_s - given),
            )
        limits.append(verdict)
    policy = ctx.engine.policy
    fields = fields_for(policy.rate_limit_header_names, ctx.engine.clock.wall)
    return fields(plan, result._replace(limits=tuple(limits)))
