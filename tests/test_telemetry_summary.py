"""The per-shape decision summary: cached only where the cached value cannot differ."""

from __future__ import annotations

import itertools

from tests.test_telemetry_helpers import counter_values, metric_points, pipeline

from fidelity_mw import Policy, RateLimit
from fidelity_mw.context import Decision, DecisionContext
from fidelity_mw.decide.breaker import Gate
from fidelity_mw.decide.gcra import LimitVerdict
from fidelity_mw.engine import Engine
from fidelity_mw.inbound.admission import admission_decisions
from fidelity_mw.state.base import InboundResult
from fidelity_mw.telemetry import schema
from fidelity_mw.telemetry.summary import summarize, summary_of


def _allowed(subject: str, at: float, remaining: int) -> list[Decision]:
    return [
        Decision("deadline", "/a", "allow", "caller_deadline", "request", 0.0, at, {"ms": 1.5}),
        Decision("breaker", "/a", "allow", "breaker_closed", "memory", 0.0, at),
        Decision("ratelimit", subject, "allow", "under_limit", "memory", 0.0, at, {"r": remaining}),
    ]


def test_same_shape_is_summarised_once_whatever_subject_time_and_details() -> None:
    first = summarize(_allowed("per-client", 1.0, 9))
    again = summarize(_allowed("per-client", 2.0, 3))
    assert again is first
    assert first.packed == (
        "deadline/allow/caller_deadline@request breaker/allow/breaker_closed@memory "
        "ratelimit:per-client/allow/under_limit@memory"
    )
    # a rate limit's entry names its limit (review 9): another limit is another shape;
    # other layers' subjects (a route, an upstream host) are not in the summary
    other = summarize(_allowed("per-key", 1.0, 9))
    assert other is not first
    assert other.packed.endswith(" ratelimit:per-key/allow/under_limit@memory")
    routed = [
        d._replace(subject="/b") if d.layer != "ratelimit" else d
        for d in _allowed("per-client", 1.0, 9)
    ]
    assert summarize(routed) is first
    odd = summarize(_allowed("api/v1 @ 50%: x", 1.0, 9))
    assert odd.packed.endswith(" ratelimit:api%2Fv1%20%40%2050%25%3A%20x/allow/under_limit@memory")
    assert (first.stale, first.flagged, first.plain) == (0, False, True)
    assert first.counter_keys == (
        ("deadline", "allow", "request"),
        ("breaker", "allow", "memory"),
        ("ratelimit", "allow", "memory"),
    )


def test_a_different_verdict_reason_or_source_is_another_shape() -> None:
    base = _allowed("per-client", 1.0, 9)
    rejected = [*base[:2], Decision("ratelimit", "per-client", "reject", "over_limit", "memory")]
    cached = [*base[:2], Decision("ratelimit", "per-client", "allow", "under_limit", "cache")]
    summaries = [summarize(base), summarize(rejected), summarize(cached)]
    assert len({id(s) for s in summaries}) == 3
    assert summaries[1].flagged
    assert summaries[1].packed.endswith("ratelimit:per-client/reject/over_limit@memory")
    assert (summaries[2].stale, summaries[2].plain) == (1, False)
    assert summarize([]).packed == ""


def test_decisions_with_a_state_age_are_not_cached() -> None:
    aged = [Decision("ratelimit", "k", "allow", "under_limit", "redis", 1.5, 1.0)]
    first, second = summarize(aged), summarize(list(aged))
    assert first is not second
    assert first.packed == second.packed == "ratelimit:k/allow/under_limit@redis+1500ms"
    assert (first.stale, first.aged, first.plain) == (1, True, False)


def test_metrics_from_a_cached_shape_still_read_subjects_and_ages() -> None:
    """The second call's summary comes from the cache: the retry budget counter and
    the state-age histogram, which read each decision's subject and age, still count it."""
    p = pipeline()
    engine = Engine(Policy())
    for subject in ("api:8080", "pay:443"):
        ctx = DecisionContext(engine, "outbound", "GET", 0.0)
        ctx.add(Decision("retry", subject, "retry", "status_503", "memory", 0.0, 1.0))
        ctx.add(Decision("breaker", subject, "allow", "breaker_closed", "fallback", 0.0, 1.0))
        p.telemetry.call_end(ctx)
    budget = counter_values(
        p.metrics, "fidelity.retry_budget.usage", schema.SUBJECT, schema.BUDGET_RESULT
    )
    assert budget == {("api:8080", "drawn"): 1, ("pay:443", "drawn"): 1}
    decisions = counter_values(p.metrics, "fidelity.decisions", schema.LAYER, schema.VERDICT)
    assert decisions == {("retry", "retry"): 2, ("breaker", "allow"): 2}
    ages = metric_points(p.metrics, "fidelity.state.age")
    assert [(a[schema.STATE_SOURCE], pt.count) for a, pt in ages] == [("fallback", 2)]
    p.shutdown()


def test_request_counts_by_shape_reach_the_counters_across_inline_flushes() -> None:
    """Requests of a cached shape are counted once each and folded into the counters
    when read, or earlier when too many kinds are pending: nothing is lost either way."""
    p = pipeline()
    engine = Engine(Policy())
    routes = [f"/r{i}" for i in range(1500)]  # more kinds than are kept pending
    for i, route in enumerate([*routes, *routes[:10]]):
        ctx = DecisionContext(engine, route, "GET", 0.0)
        ctx.add(Decision("breaker", route, "allow", "breaker_closed", "memory", 0.0, 1.0))
        ctx.outcome, ctx.decided_by = ("failed", "app") if i % 2 else ("served", "app")
        p.telemetry.end(ctx, {}, None)
    requests = counter_values(p.metrics, "fidelity.requests", schema.ROUTE)
    assert sum(requests.values()) == 1510
    assert requests[("/r3",)] == 2
    assert requests[("/r1499",)] == 1
    failures = counter_values(p.metrics, "fidelity.failures", schema.FAILURE_CAUSE)
    assert failures == {("app",): 755}
    decisions = counter_values(p.metrics, "fidelity.decisions", schema.LAYER, schema.VERDICT)
    assert decisions == {("breaker", "allow"): 1510}
    p.shutdown()


def _facts_context(
    engine: Engine, deadline: str | None, gate: Gate | None, limits: str, source: str
) -> tuple[DecisionContext, InboundResult]:
    """`limits`: one letter per limit's verdict: a(llowed), c(redit: allowed from the
    retry credit), r(efused)."""
    plan = engine.plan_for({"type": "http", "method": "GET", "path": "/a"})
    ctx = DecisionContext(engine, plan.route, "GET", 10.0)
    if deadline is not None:
        ctx.deadline_at = 12.5
        ctx.deadline_from_caller = deadline == "caller"
    verdicts = tuple(
        LimitVerdict(v != "r", 0.0, 0 if v == "r" else 3, 1.0, 0.5 if v == "r" else 0.0, v == "c")
        for v in limits
    )
    result = InboundResult(gate, verdicts, True, source, 0.0)
    ctx._pending = (admission_decisions, plan, result, 10.0)
    return ctx, result


def test_the_summary_of_pending_facts_is_the_summary_of_the_records_they_build() -> None:
    """Differential: for every combination of facts, the summary looked up from the
    facts (records never built) equals the summary of the records built from them,
    on the first request of a shape and on the next ones."""
    engine = Engine(
        Policy(
            rate_limits=[
                RateLimit(name="hard", rate="10/s"),
                RateLimit(name="trial", rate="1/s", shadow=True),
            ]
        )
    )
    gates = [
        None,
        Gate("allow", "closed", 0, 0.0),
        Gate("probe", "half_open", 1, 0.0, 7),
        Gate("reject", "open", 1, 2.0),
    ]
    seen = set()
    for deadline, gate, allowed, source in itertools.product(
        (None, "route", "caller"),
        gates,
        ("aa", "ar", "ra", "rr", "ca", "ac", "cr", ""),
        ("memory", "redis"),
    ):
        for attempt in range(2):  # the second: from the cache
            ctx, _result = _facts_context(engine, deadline, gate, allowed, source)
            fast = summary_of(ctx)
            assert ctx._pending is not None or attempt == 0  # built only for a new shape
            built = summarize(ctx.decisions)
            assert (fast.packed, fast.stale, fast.flagged, fast.plain, fast.count) == (
                built.packed,
                built.stale,
                built.flagged,
                built.plain,
                len(ctx.decisions),
            )
            assert fast.counter_keys == built.counter_keys
        seen.add(fast.packed)
    assert len(seen) > 60  # the combinations really differ
    assert any("retry_credit" in packed for packed in seen)


def test_facts_with_a_state_age_or_records_already_made_are_summarised_from_records() -> None:
    engine = Engine(Policy(rate_limits=[RateLimit(name="hard", rate="10/s")]))
    ctx, result = _facts_context(engine, "caller", None, "a", "redis")
    ctx._pending = (admission_decisions, ctx._pending[1], result._replace(age_s=1.5), 10.0)
    assert summary_of(ctx).packed.endswith("ratelimit:hard/allow/under_limit@redis+1500ms")
    assert ctx._pending is None  # built: an age is not a shape
    # A decision taken before the admission's (a bulkhead's wait) comes first.
    ctx, _result = _facts_context(engine, None, None, "a", "memory")
    ctx._decisions.append(Decision("concurrency", "/a", "queued", "waited", "memory"))
    assert summary_of(ctx).packed == (
        "concurrency/queued/waited@memory ratelimit:hard/allow/under_limit@memory"
    )
