"""The fused allowed path (`admission.fast_admission`) against the general path.

Two middlewares on the same random policy, each with its own memory store, fake clock
and seeded randomness; one of them never takes the fused path (`_fast_ok = False`).
The same random request sequence (clock steps, clients, deadline headers well formed,
malformed, repeated or absent, the attempt header, API keys, the app's status or its
exception) goes through both, and after every request everything must be the same:
what the client got (every message the middleware sent), the request's context (its
deadline, client key, outcome, response fields and every decision record, built from
its facts), and the store (every limiter key's TAT, interval, refunds and credit; every
breaker's state, epoch, window, probes and open time).
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.inbound import admission
from fidelity_mw.policy import (
    BreakerConfig,
    ConcurrencyConfig,
    DeadlineConfig,
    RateLimit,
)
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

T0 = 1_000.0
PATHS = ("/api/a", "/api/b", "/other")


class App:
    """Answers with the status the test chose for this request, or raises; "exhausted"
    and "shed" answer 502 / 503 as the outbound layer's give-up or refusal (both refund
    the request's quota)."""

    def __init__(self) -> None:
        self.outcome: int | str = 200

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        status = self.outcome
        if status == "raise":
            raise RuntimeError("the app failed")
        if status == "exhausted":
            scope["state"]["fidelity"].upstream_exhausted = True
            status = 502
        elif status == "shed":
            scope["state"]["fidelity"].shed_by = "breaker"
            status = 503
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})


def build(policy: Policy, fast: bool, max_keys: int) -> tuple[FidelityMiddleware, App, FakeClock]:
    app = App()
    clock = FakeClock(start=T0)
    rng = seeded_random(3)
    store = MemoryStore(max_keys=max_keys, rng=rng)
    mw = FidelityMiddleware(app, policy=policy, clock=clock, rng=rng, store=store, telemetry=False)
    if not fast:
        mw._fast_ok = False
    return mw, app, clock


limit_st = st.builds(
    RateLimit,
    name=st.sampled_from(["a", "b", "c"]),
    rate=st.sampled_from(["1/s", "2/s", "5/s", "3/10s", "50/s"]),
    burst=st.integers(2, 6),
    cost=st.sampled_from([1, 1, 1, 2]),
    key=st.sampled_from(["client_ip", "client_ip", "client_ip", "global", "header:x-key"]),
    match=st.sampled_from(["*", "*", "/api/*"]),
    shadow=st.sampled_from([False, False, False, True]),
    charge=st.sampled_from(["served", "always"]),
    retry_credit_s=st.sampled_from([0.0, 2.0]),
)
# half the time the shape the fused path takes: one limit by client address
common_limit_st = st.builds(
    RateLimit,
    name=st.just("per-client"),
    rate=st.sampled_from(["1/s", "2/s", "5/s", "3/10s", "50/s"]),
    burst=st.integers(2, 6),
    cost=st.sampled_from([1, 1, 1, 2]),
    charge=st.sampled_from(["served", "always"]),
    retry_credit_s=st.sampled_from([0.0, 2.0]),
)
limits_st = st.one_of(
    st.tuples(common_limit_st),
    st.lists(limit_st, max_size=2, unique_by=lambda lim: lim.name),
)
breaker_st = st.one_of(
    st.none(),
    st.sampled_from([None, None, 1000]).flatmap(
        lambda slow_ms: st.builds(
            BreakerConfig,
            min_calls=st.integers(1, 4),
            window_s=st.sampled_from([1.0, 10.0]),
            open_s=st.sampled_from([0.5, 2.0]),
            open_min_s=st.sampled_from([0.2, 0.5]),
            half_open_probes=st.integers(1, 2),
            consecutive_failures=st.one_of(st.none(), st.integers(1, 3)),
            slow_call_ms=st.just(slow_ms),
            slow_call_ratio=st.just(None if slow_ms is None else 0.5),
        )
    ),
)
deadline_st = st.builds(
    DeadlineConfig,
    header=st.sampled_from(
        [("x-request-timeout-ms",), ("x-request-timeout-ms", "grpc-timeout"), ("x-none",)]
    ),
    default_ms=st.sampled_from([None, 1_500, 200]),
    max_ms=st.sampled_from([None, None, 1_500]),
)
policy_st = st.one_of(
    st.builds(  # anything
        Policy,
        rate_limits=limits_st,
        breaker=breaker_st,
        deadline=deadline_st,
        concurrency=st.sampled_from([None, None, None, ConcurrencyConfig(limit=5)]),
        trusted_proxies=st.sampled_from([(), (), ("10.0.0.0/8",)]),
        rate_limit_headers=st.sampled_from(["always", "always", "on_reject", "never"]),
        rate_limit_header_names=st.sampled_from(["ietf", "ietf", "x-ratelimit", "both"]),
    ),
    st.builds(  # the fused path's shape, most of the time
        Policy,
        rate_limits=st.tuples(common_limit_st),
        breaker=breaker_st,
        deadline=deadline_st,
        rate_limit_headers=st.sampled_from(["always", "always", "on_reject", "never"]),
    ),
)

deadline_values = st.sampled_from(
    [b"5000", b"5000", b"800", b"0", b"-3", b"junk", b"1.5", b"99999999", b"100"]
)
request_st = st.fixed_dictionaries(
    {
        "advance": st.sampled_from([0.0, 0.05, 0.05, 0.3, 0.3, 1.0, 3.0, 11.0]),
        "path": st.sampled_from(PATHS),
        "method": st.sampled_from(["GET", "GET", "GET", "GET", "POST", "OPTIONS"]),
        "client": st.sampled_from(["10.1.2.3", "10.1.2.3", "192.0.2.7", "127.0.0.1", None]),
        "deadline": st.one_of(
            st.just([b"5000"]),
            st.just([b"5000"]),
            st.just([]),
            st.lists(deadline_values, max_size=2),
        ),
        "grpc": st.sampled_from([None] * 9 + [b"2S", b"bad"]),
        "attempt": st.sampled_from([None] * 9 + [b"2"]),
        "api_key": st.sampled_from([None, b"k1"]),
        "forwarded": st.sampled_from([None] * 4 + [b"203.0.113.9"]),
        "outcome": st.sampled_from(
            [200, 200, 200, 200, 201, 404, 429, 500, 503, "raise", "exhausted", "shed"]
        ),
    }
)


def scope_of(req: dict[str, Any]) -> dict[str, Any]:
    headers = [(b"host", b"api.example"), (b"accept", b"*/*")]
    headers += [(b"x-request-timeout-ms", value) for value in req["deadline"]]
    for name, key in (
        (b"grpc-timeout", "grpc"),
        (b"x-fidelity-attempt", "attempt"),
        (b"x-key", "api_key"),
        (b"x-forwarded-for", "forwarded"),
    ):
        if req[key] is not None:
            headers.append((name, req[key]))
    scope: dict[str, Any] = {
        "type": "http",
        "method": req["method"],
        "path": req["path"],
        "headers": headers,
    }
    if req["client"] is not None:
        scope["client"] = (req["client"], 40000)
    return scope


async def run(mw: FidelityMiddleware, app: App, req: dict[str, Any]) -> dict[str, Any]:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    app.outcome = req["outcome"]
    scope = scope_of(req)
    raised = None
    try:
        await mw(scope, receive, send)
    except RuntimeError as exc:
        raised = str(exc)
    ctx = scope["state"]["fidelity"]
    return {
        "sent": sent,
        "raised": raised,
        "ctx": {
            name: getattr(ctx, name)
            for name in (
                "route",
                "method",
                "started_at",
                "deadline_at",
                "deadline_from_caller",
                "client_key",
                "decided_by",
                "outcome",
                "status",
                "trusted_peer",
                "inbound_attempt",
                "response_headers",
                "response_complete",
            )
        },
        "decisions": [tuple(d) for d in ctx.decisions],
    }


def store_state(mw: FidelityMiddleware) -> dict[str, Any]:
    store = mw.engine.store
    assert type(store) is MemoryStore
    table = store.limits
    breakers = {
        key: (
            b.state,
            b.epoch,
            b.open_until,
            b.opened_at,
            b.consecutive,
            b.reopens,
            [list(x) for x in b.buckets],
            list(b._totals),
            b._bucket_end,
            dict(b.probes),
            tuple(b.closed_gate),
            b.next_probe_id,
        )
        for key, b in store.breakers.items()
    }
    return {
        "tats": dict(table.tats),
        "intervals": dict(table.intervals),
        "refunded": dict(table.refunded),
        "credits": dict(table.credits),
        "next_sweep": table.next_sweep,
        "breakers": breakers,
    }


def compare(policy: Policy, requests: list[dict[str, Any]], max_keys: int = 100_000) -> int:
    """Run both; return how many requests the fused path decided."""
    fast_mw, fast_app, fast_clock = build(policy, fast=True, max_keys=max_keys)
    slow_mw, slow_app, slow_clock = build(policy, fast=False, max_keys=max_keys)
    fused = 0

    async def go() -> None:
        nonlocal fused
        for i, req in enumerate(requests):
            fast_clock.advance(req["advance"])
            slow_clock.advance(req["advance"])
            for route_key, route in list(fast_mw._fast_routes.items()):
                if route and not hasattr(route[1], "counted"):
                    fast_mw._fast_routes[route_key] = (route[0], counting(route[1]))
            before = counts[0]
            got = await run(fast_mw, fast_app, req)
            fused += counts[0] - before
            want = await run(slow_mw, slow_app, req)
            assert got == want, (i, req)
            assert store_state(fast_mw) == store_state(slow_mw), (i, req)

    counts = [0]

    def counting(admit: Any) -> Any:
        def counted(*args: Any) -> Any:
            answer = admit(*args)
            if answer is not None:
                counts[0] += 1
            return answer

        counted.counted = True  # type: ignore[attr-defined]
        return counted

    asyncio.run(go())
    assert not slow_mw._fast_routes
    return fused


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    policy=policy_st,
    requests=st.lists(request_st, min_size=20, max_size=60),
    max_keys=st.sampled_from([100_000, 100_000, 2]),  # 2: the table sweeps and evicts
)
def test_fast_path_equals_general_path(
    policy: Policy, requests: list[dict[str, Any]], max_keys: int
) -> None:
    fused = compare(policy, requests, max_keys)
    event("fused requests: " + ("none" if not fused else "1-9" if fused < 10 else "10 or more"))


def ordinary(n: int, **changes: Any) -> list[dict[str, Any]]:
    req = {
        "advance": 0.05,
        "path": "/api/a",
        "method": "GET",
        "client": "10.1.2.3",
        "deadline": [b"5000"],
        "grpc": None,
        "attempt": None,
        "api_key": None,
        "forwarded": None,
        "outcome": 200,
    }
    req.update(changes)
    return [dict(req) for _ in range(n)]


COMMON = Policy(rate_limits=[RateLimit(name="per-client", rate="100/s", burst=10)])


def test_the_common_shape_takes_the_fused_path() -> None:
    # the route's first request builds its plan and parses the deadline value (the
    # general way): every later one is fused
    assert compare(COMMON, ordinary(12)) == 11
    # no deadline header: the route's default
    assert compare(COMMON, ordinary(5, deadline=[])) == 4
    # a new deadline value is parsed the general way once, then fused
    assert compare(COMMON, ordinary(3) + ordinary(3, deadline=[b"700"])) == 4
    # refused (the burst of 10 spent at one instant): decided the general way
    assert compare(COMMON, ordinary(14, advance=0.0)) == 9
    # two clients, each its own key
    assert compare(COMMON, ordinary(3) + ordinary(3, client="192.0.2.7")) == 5


def test_what_is_not_ordinary_falls_back() -> None:
    for changes in (
        {"deadline": [b"junk"]},  # malformed
        {"deadline": [b"0"]},  # expired on arrival
        {"deadline": [b"5000", b"5000"]},  # repeated
        {"attempt": b"2"},  # the attempt header
        {"grpc": b"2S"},  # a second deadline header
    ):
        assert compare(COMMON, ordinary(6, **changes)) == 0, changes
    # failures open the breaker: its requests and the half-open probes are not fused
    failing = ordinary(30, outcome=500)
    policy = Policy(
        rate_limits=[RateLimit(name="per-client", rate="100/s")],
        breaker=BreakerConfig(min_calls=3, open_s=0.5, open_min_s=0.5),
    )
    assert compare(policy, failing) < 5


def test_refunds_and_sweeps_fall_back() -> None:
    # an upstream's give-up refunds the request's units (charge = "served"): while the
    # key has refunded seconds its admissions report a marker (decide.gcra.marker), the
    # general way
    refunding = ordinary(5, advance=0.0) + ordinary(4, outcome="exhausted", advance=0.0)
    refunding += ordinary(3, advance=0.0)
    # fused: the four after the first, and the first 5xx (no refund before it)
    assert compare(COMMON, refunding) == 5
    # a table due for a sweep: made room for the general way (four clients, room for two)
    clients = [
        req
        for i in range(12)
        for req in ordinary(1, client=f"10.0.0.{i % 4}", advance=0.001 * (i % 2))
    ]
    assert 0 < compare(COMMON, clients, max_keys=2) < 11


def test_routes_not_of_the_common_shape_have_no_fused_path() -> None:
    for policy in (
        Policy(rate_limits=[RateLimit(name="g", rate="5/s", key="global")]),
        Policy(rate_limits=[RateLimit(name="a", rate="5/s"), RateLimit(name="b", rate="9/s")]),
        Policy(rate_limits=[RateLimit(name="s", rate="5/s", shadow=True)]),
        Policy(rate_limits=[RateLimit(name="a", rate="5/s")], concurrency=ConcurrencyConfig()),
        Policy(rate_limits=[RateLimit(name="a", rate="5/s")], trusted_proxies=("10.0.0.0/8",)),
        Policy(rate_limits=[RateLimit(name="a", rate="5/s")], rate_limit_header_names="both"),
        Policy(),
    ):
        assert compare(policy, ordinary(4)) == 0, policy
    # telemetry on (an observer): no fused path
    mw = FidelityMiddleware(App(), policy=COMMON, observer=object())  # type: ignore[arg-type]
    assert not mw._fast_ok


def test_fused_fields_are_those_of_ratelimit_headers() -> None:
    # (r, t) pairs the table has not seen, and the table full: cleared, as the general
    # path clears it
    admission._FIELDS.clear()
    admission._FIELDS.update({(b"x", i, 0): (b"ratelimit", b"x") for i in range(4095)})
    assert compare(COMMON, ordinary(8, advance=0.4)) == 7
