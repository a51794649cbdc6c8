"""Admission: the store's answer for one request, as decisions and (maybe) a refusal.

The deadline, breaker and limiter records are built lazily (`ctx._pending`) on
the allowed path: most requests never have their decisions read.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Final, Protocol

from .._logs import warn
from ..context import (
    ALLOW,
    LAYER_BREAKER,
    LAYER_DEADLINE,
    LAYER_RATELIMIT,
    LAYER_STATE,
    PROBE,
    REJECT,
    SHED,
    SOURCE_FALLBACK,
    SOURCE_REQUEST,
    WOULD_REJECT,
    Decision,
    DecisionContext,
    DetailValue,
)
from ..decide.fleet import FleetShare
from ..decide.gcra import LimitVerdict
from ..errors import StateUnavailable
from ..policy import Policy
from ..routeplan import RoutePlan
from ..state.base import InboundResult, LimitSpec, state_age_s, state_why
from .responses import (
    OUTCOME_REJECTED,
    OUTCOME_SHED,
    Rejection,
    problem_body,
    refusal_retry_after,
    state_unavailable_body,
)

logger: Final = logging.getLogger("fidelity_mw")

# The allowed path's records are made with tuple.__new__ and all eight fields: the
# NamedTuple's own __new__ is a Python function, a frame per record, and telemetry
# reads every request's decisions.
_record: Final = tuple.__new__


def warn_without_state(exc: Exception) -> None:
    """The log line of a decision taken without the store (throttled: one per outage,
    not one per request)."""
    kind = type(exc).__name__
    warn(logger, kind, "fidelity_mw: deciding without state (%s: %s)", kind, exc)


class FieldsFn(Protocol):
    """What makes a response's rate-limit fields (`ratelimit_headers`, or another
    set by `rate_limit_header_names`: inbound/xratelimit.py)."""

    def __call__(
        self, plan: RoutePlan, result: InboundResult, retry_after: int | None = None
    ) -> list[tuple[bytes, bytes]]: ...


class Admission:
    """Turns `StateStore.admit` answers (or its failure) into decisions and refusals."""

    __slots__ = ("fields", "headers_mode", "on_error")

    def __init__(self, policy: Policy, fields: FieldsFn | None = None) -> None:
        self.headers_mode = policy.rate_limit_headers
        self.on_error = policy.state.on_error
        # the fields by `rate_limit_header_names` (xratelimit.fields_for); IETF's alone
        self.fields: FieldsFn = fields if fields is not None else ratelimit_headers

    def verdict(
        self, ctx: DecisionContext, plan: RoutePlan, result: InboundResult, now: float
    ) -> Rejection | None:
        """Turn the store's answer into a response (if rejected) and decision facts."""
        gate = result.gate
        if gate is not None and gate.verdict == "reject":
            admission_decisions(ctx, plan, result, now)
            ctx.decided_by = LAYER_BREAKER
            ctx.outcome = OUTCOME_SHED
            wait = refusal_retry_after(gate.retry_after_s)
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
            ctx._pending = (admission_decisions, plan, result, now)
            if plan.policy_header is not None and self.headers_mode == "always":
                ctx.response_headers = self.fields(plan, result)
            return None
        admission_decisions(ctx, plan, result, now)
        worst = -1
        worst_wait = -1.0
        for i, verdict in enumerate(result.limits):
            blocking = not verdict.allowed and not plan.specs[i].shadow
            if blocking and verdict.retry_after_s > worst_wait:
                worst, worst_wait = i, verdict.retry_after_s
        ctx.decided_by = LAYER_RATELIMIT
        ctx.outcome = OUTCOME_REJECTED
        name = plan.specs[worst].name
        wait = refusal_retry_after(worst_wait)
        headers = [(b"retry-after", wait.encode())]
        if self.headers_mode != "never" and plan.policy_header is not None:
            headers.extend(self.fields(plan, result, int(wait)))
        body = problem_body(
            429,
            "Too Many Requests",
            f"rate limit {name!r} exceeded; retry in {wait} s",
            "rate-limited",
            limit=name,
        )
        return 429, headers, body

    def state_failure(
        self, ctx: DecisionContext, plan: RoutePlan, exc: Exception, now: float
    ) -> Rejection | None:
        """The store (or our own code) failed: decide per `state.on_error`."""
        warn_without_state(exc)
        closed = self.on_error == "closed"
        layer = LAYER_BREAKER if plan.breaker_key is not None else LAYER_RATELIMIT
        # A rate limit's records are named by the limit (the summary says
        # `ratelimit:<name>`): the first enforced limit's, not the route's name
        subject = plan.route
        if layer == LAYER_RATELIMIT and plan.specs:
            subject = next((x.name for x in plan.specs if not x.shadow), plan.specs[0].name)
        ctx._pending = None
        admission_decisions(ctx, plan, None, now)
        details: dict[str, DetailValue] = {"on_error": self.on_error}
        # the exception's own reason first: with Redis up (this call failed) only it knows
        why = exc.why if isinstance(exc, StateUnavailable) and exc.why else None
        why = why or state_why(ctx.engine.store)
        if why is not None:  # (unreachable, read_only, error)
            details["fallback_why"] = why
        ctx.decisions.append(
            Decision(
                layer,
                subject,
                REJECT if closed else ALLOW,
                f"state_error:{type(exc).__name__}",
                SOURCE_FALLBACK,
                state_age_s(ctx.engine.store),
                now,
                details,
            )
        )
        if not closed:
            return None
        # no breaker is open, no limit exhausted: the state could not be read (the
        # record says whose, and why: `state_error:<exception>`, `fallback_why`)
        ctx.decided_by = LAYER_STATE
        ctx.outcome = OUTCOME_SHED
        # (the detail says why, as `fallback_why` does: responses.state_unavailable_body)
        return 503, [(b"retry-after", b"1")], state_unavailable_body(why)


# what `admission_decisions` reads of each limit's verdict to choose its verdict and
# reason, read in C
_VERDICT_SHAPE: Final = operator.attrgetter("allowed", "credit")


def admission_shape(
    ctx: DecisionContext, plan: RoutePlan, result: InboundResult | None
) -> tuple[object, ...] | None:
    """A key equal for two requests whose `admission_decisions`, built now, would have
    the same layers, verdicts, reasons, sources and state ages (all a summary reads),
    without building them; None when the state had an age (it varies per request).
    Kept beside `admission_decisions`: it reads the facts that function branches on."""
    deadline: object = None
    if ctx.deadline_at is not None:
        # (past on arrival: `would_reject`, whoever set it)
        deadline = ctx.deadline_from_caller if ctx.deadline_at > ctx.started_at else "expired"
    if result is None:
        return (plan, deadline)
    if result.age_s:
        return None
    gate = result.gate
    return (
        plan,
        deadline,
        result.source,
        None if gate is None else gate.verdict,
        None if gate is None else gate.state,
        tuple(map(_VERDICT_SHAPE, result.limits)),
    )


def admission_decisions(
    ctx: DecisionContext, plan: RoutePlan, result: InboundResult | None, now: float
) -> None:
    """Build the deadline, breaker and limiter decision records from the facts.
    (A fact this reads to choose a verdict or reason belongs in `admission_shape`.)"""
    append = ctx._decisions.append
    if ctx.deadline_at is not None:
        remaining = ctx.deadline_at - now
        details: dict[str, DetailValue] = {"remaining_ms": round(remaining * 1000.0, 3)}
        if remaining > 0.0:
            reason = "caller_deadline" if ctx.deadline_from_caller else "route_default"
            deadline = (LAYER_DEADLINE, ctx.route, ALLOW, reason, SOURCE_REQUEST, 0.0, now, details)
            append(_record(Decision, deadline))
        else:
            # past on arrival, on a route that does not enforce deadlines (`enforce =
            # false`; one that does answers 504 first): recorded, never refused
            details["enforce"] = False
            append(
                Decision(
                    LAYER_DEADLINE,
                    ctx.route,
                    WOULD_REJECT,
                    "expired_on_arrival",
                    SOURCE_REQUEST,
                    0.0,
                    now,
                    details,
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
        if gate.verdict == "probe":
            append(Decision(LAYER_BREAKER, plan.route, PROBE, "half_open_probe", source, age, now))
        else:
            fell = None if result.why is None else {"fallback_why": result.why}
            closed = (LAYER_BREAKER, plan.route, ALLOW, "breaker_closed", source, age, now, fell)
            append(_record(Decision, closed))
    fleet = fleet_details(result.fleet) if result.fleet is not None else {}
    if result.why is not None:  # a shared store decided without its state: why
        fleet["fallback_why"] = result.why
    for spec, verdict in zip(plan.specs, result.limits, strict=False):
        if verdict.allowed:
            details = {"remaining": verdict.remaining, **fleet}
            # (admitted from the retry credit of refunds: the bucket alone would refuse it)
            why = "retry_credit" if verdict.credit else "under_limit"
            allowed = (LAYER_RATELIMIT, spec.name, ALLOW, why, source, age, now, details)
            append(_record(Decision, allowed))
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
                    {"retry_after_s": round(verdict.retry_after_s, 3), "shadow": True, **fleet},
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
                    {"retry_after_s": round(verdict.retry_after_s, 3), "remaining": 0, **fleet},
                )
            )


def fleet_details(share: FleetShare) -> dict[str, DetailValue]:
    """What a local fallback decision knew about the fleet (see state/fleet.py)."""
    if share.size is None:
        details: dict[str, DetailValue] = {"fleet_share": "unknown", "fleet_share_why": share.why}
    else:
        details = {"fleet_size": share.size}
    if share.age_s is not None:
        details["fleet_size_age_s"] = round(share.age_s, 3)
    if share.weight is not None:  # a share by load: the part of the limit it used
        details["fleet_weight"] = round(share.weight, 4)
        if share.load is not None:
            details["fleet_load_fraction"] = round(share.load, 3)
        elif share.load_why:  # the floor: the others may no longer count this member
            details["fleet_load_why"] = share.load_why
    elif share.load_why and share.size is not None:  # by load, but the load was unknown
        details["fleet_weight"] = round(1.0 / share.size, 4)
        details["fleet_load"] = "unknown"
        details["fleet_load_why"] = share.load_why
    return details


def quota_wait_s(verdict: LimitVerdict, spec: LimitSpec) -> float:
    """Seconds until more quota is available: the RateLimit `t` parameter
    (draft-ietf-httpapi-ratelimit-headers-10 section 4.1.2; -11 keeps the value and
    calls it the effective window). Refused: until the request would be admitted.
    Admitted: until the bucket holds one more whole unit than `r`."""
    if not verdict.allowed:
        # (a store's wait of 0, negative or NaN: no `t` below 0, nor a NaN to round)
        refused = verdict.retry_after_s
        return refused if refused > 0.0 else 0.0
    wait = verdict.reset_s - spec.tolerance_s + (verdict.remaining + 1) * spec.interval_s
    return wait if wait > 0.0 else 0.0


# (advertised item prefix, r, t) -> the RateLimit field of one admitted limit
_FIELDS: Final[dict[tuple[bytes, int, int], tuple[bytes, bytes]]] = {}
_MAX_FIELDS: Final = 4096


def ratelimit_headers(
    plan: RoutePlan, result: InboundResult, retry_after: int | None = None
) -> list[tuple[bytes, bytes]]:
    """RateLimit-Policy (static per route) and RateLimit (remaining; seconds until more
    quota). With a Retry-After, no `t` points past it: "within t s no more than r" stays
    true for any shorter t, and the draft wants Retry-After no earlier than `t`."""
    one = plan.one_advertised
    if one is not None:
        verdict = result.limits[0]
        if verdict.allowed:
            # the common case on the allowed path: one advertised limit, and it admitted
            item, tolerance_s, interval_s = one
            remaining = verdict.remaining
            wait = verdict.reset_s - tolerance_s + (remaining + 1) * interval_s
            t = math.ceil(wait - 1e-9) if wait > 0.0 else 0
            if retry_after is not None and t > retry_after:
                t = retry_after
            # A client's requests repeat a few (r, t) pairs: their fields are kept, not
            # formatted again (about 1 µs per request under a server).
            key = (item, remaining, t)
            field = _FIELDS.get(key)
            if field is None:
                if len(_FIELDS) >= _MAX_FIELDS:
                    _FIELDS.clear()
                field = _FIELDS[key] = (b"ratelimit", item + b"%d;t=%d" % (remaining, t))
            return [plan.policy_field, field]
    items = []
    # shadow limits (prefix None) are not advertised: they are never enforced
    for prefix, spec, verdict in zip(
        plan.remaining_prefixes, plan.specs, result.limits, strict=True
    ):
        if prefix is None:
            continue
        # The slack absorbs float noise: a wait of exactly 10 s must not read 11.
        t = math.ceil(quota_wait_s(verdict, spec) - 1e-9)
        if retry_after is not None and t > retry_after:
            t = retry_after
        items.append(prefix + b"%d;t=%d" % (verdict.remaining, t))
    return [plan.policy_field, (b"ratelimit", b", ".join(items))]
