"""FastAPI per-route forms through real FastAPI apps: the limit dependency, the breaker and
deadline decorators, the route class, the exceptions and the OpenAPI they document."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse

import fidelity_mw
from fidelity_mw import (
    BreakerConfig,
    DecisionContext,
    FidelityMiddleware,
    Policy,
    RateLimit,
)
from fidelity_mw.fastapi import PROBLEM_SCHEMA, Fidelity, RateLimited
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random
from test_telemetry_helpers import Pipeline, decision_events, pipeline

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


class Recorder:
    """A RequestObserver that keeps every request's DecisionContext."""

    def __init__(self) -> None:
        self.contexts: list[DecisionContext] = []

    def start(self, ctx: DecisionContext, scope: Any) -> None:
        return None

    def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.contexts.append(ctx)


def build(
    fidelity: Fidelity, *, routed: bool = True, flaky_status: list[int] | None = None
) -> FastAPI:
    """/keyed (async, limit by API key), /sync (sync, limit by IP), /flaky (breaker override),
    /slow (deadline override), /plain (no form) - behind an APIRouter."""
    router = APIRouter(route_class=fidelity.route_class) if routed else APIRouter()
    statuses = flaky_status if flaky_status is not None else [500]

    @router.get(
        "/keyed/{item}",
        dependencies=[Depends(fidelity.limit("2/min", key="header:x-api-key"))],
    )
    async def keyed(item: str) -> dict[str, str]:
        return {"item": item}

    @router.get("/sync", dependencies=[Depends(fidelity.limit("1/min"))])
    def sync_endpoint() -> dict[str, str]:
        return {"ok": "sync"}

    @router.get("/flaky")
    @fidelity.breaker(min_calls=2, failure_ratio=0.5, open_jitter=0.0, open_s=5.0, open_min_s=5.0)
    async def flaky() -> PlainTextResponse:
        return PlainTextResponse("flaky", status_code=statuses[0])

    @router.get("/slow")
    @fidelity.deadline(1_500)
    def slow() -> dict[str, float | None]:
        ctx = fidelity_mw.current()
        assert ctx is not None
        remaining = ctx.remaining_s(ctx.engine.clock.monotonic())
        return {"remaining_s": remaining}

    app = FastAPI()
    app.include_router(router)

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {"ok": "plain"}

    return app


def with_middleware(app: FastAPI, clock: FakeClock, **options: Any) -> FastAPI:
    options.setdefault("policy", Policy(breaker=None))
    app.add_middleware(
        FidelityMiddleware, clock=clock, rng=seeded_random(3), telemetry=False, **options
    )
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


# ---------------------------------------------------------------- behind the middleware


async def test_limit_dependency_shares_the_middleware_context_and_store(
    clock: FakeClock,
) -> None:
    fidelity = Fidelity()
    recorder = Recorder()
    store = MemoryStore(rng=seeded_random(4))
    app = with_middleware(build(fidelity), clock, observer=recorder, store=store)
    fidelity.install(app)
    async with client(app) as c:
        answers = [(await c.get("/keyed/a", headers={"x-api-key": "k1"})) for _ in range(3)]
        other = await c.get("/keyed/b", headers={"x-api-key": "k2"})
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert other.status_code == 200  # another key has its own counter
    assert answers[0].headers["ratelimit-policy"] == '"/keyed/{item}:2/min";q=2;w=60'
    # t: seconds until more quota (one unit of 2/min), as the middleware's fields say it
    assert answers[1].headers["ratelimit"] == '"/keyed/{item}:2/min";r=0;t=30'
    rejected = answers[2]
    assert rejected.headers["content-type"] == PROBLEM
    assert rejected.headers["retry-after"] == "30"
    assert rejected.headers["ratelimit"] == '"/keyed/{item}:2/min";r=0;t=30'
    body = rejected.json()
    assert body["type"] == "urn:fidelity-mw:problem:rate-limited"
    assert body["status"] == 429
    assert body["limit"] == "/keyed/{item}:2/min"
    # the same context as the middleware's: its deadline decision, then ours
    ctx = recorder.contexts[2]
    assert ctx.engine.store is store
    assert [(d.layer, d.verdict) for d in ctx.decisions] == [
        ("deadline", "allow"),
        ("ratelimit", "reject"),
    ]
    assert ctx.decisions[1].subject == "/keyed/{item}:2/min"
    assert ctx.decisions[1].state_source == "memory"
    # the counters live in the middleware's store
    assert set(store.limits.tats) == {"/keyed/{item}:2/min|h:k1", "/keyed/{item}:2/min|h:k2"}


async def test_a_dependency_rejection_is_its_decision_and_costs_no_middleware_quota(
    clock: FakeClock,
) -> None:
    """The middleware's own per-client limit admits (and charges) the request before the
    app runs; when `Depends(limit)` then answers 429, the trace says the rate limit
    decided, the route breaker does not count it, and the middleware's units come back."""
    fidelity = Fidelity()
    recorder = Recorder()
    store = MemoryStore(rng=seeded_random(4))
    policy = Policy(rate_limits=(RateLimit(name="mw", rate="1/h", burst=3),), breaker=None)
    app = with_middleware(build(fidelity), clock, observer=recorder, store=store, policy=policy)
    fidelity.install(app)
    async with client(app) as c:
        answers = [await c.get("/sync") for _ in range(4)]
        statuses = [a.status_code for a in answers]
        # 1 served, 3 rejected by the dependency: the middleware charged only the served
        # one, so two more requests still get through its 3-unit burst
        more = [(await c.get("/plain")).status_code for _ in range(3)]
    assert statuses == [200, 429, 429, 429]
    assert [a.headers.get_list("x-fidelity-decided-by") for a in answers] == [[]] + [
        ["ratelimit"]
    ] * 3  # marked once, behind the middleware too
    assert more == [200, 200, 429]
    rejected = recorder.contexts[1]
    assert (rejected.decided_by, rejected.outcome) == ("ratelimit", "rejected")
    assert (recorder.contexts[0].decided_by, recorder.contexts[0].outcome) == ("app", "served")
    assert recorder.contexts[-1].decided_by == "ratelimit"  # the middleware's own 429


async def test_limit_decisions_land_in_the_trace() -> None:
    otel: Pipeline = pipeline()
    try:
        fidelity = Fidelity()
        app = build(fidelity)
        app.add_middleware(
            FidelityMiddleware,
            policy=Policy(breaker=None),
            clock=FakeClock(),
            observer=otel.telemetry,
        )
        fidelity.install(app)
        async with client(app) as c:
            assert (await c.get("/sync")).status_code == 200
            assert (await c.get("/sync")).status_code == 429
        spans = otel.finished()
        assert len(spans) == 2
        events = [decision_events(span) for span in spans]
        verdicts = [[(e["fidelity.layer"], e["fidelity.verdict"]) for e in es] for es in events]
        assert ("ratelimit", "reject") in verdicts[1]
        assert [e["fidelity.subject"] for e in events[1] if e["fidelity.layer"] == "ratelimit"] == [
            "/sync:1/min"
        ]
    finally:
        otel.shutdown()


async def test_breaker_decorator_changes_the_middleware_plan_for_that_route_only(
    clock: FakeClock,
) -> None:
    fidelity = Fidelity()
    recorder = Recorder()
    app = with_middleware(build(fidelity), clock, observer=recorder)
    fidelity.install(app)
    async with client(app) as c:
        statuses = [(await c.get("/flaky")).status_code for _ in range(4)]
        plain = [(await c.get("/plain")).status_code for _ in range(3)]
    # min_calls=2, every call failed: open after the second; then shed by the middleware
    assert statuses == [500, 500, 503, 503]
    assert plain == [200, 200, 200]
    shed = recorder.contexts[2]
    assert shed.route == "/flaky"  # the route keeps its template identity
    assert (shed.decided_by, shed.outcome) == ("breaker", "shed")
    engine = shed.engine
    plan = engine.plan_for({"type": "http", "method": "GET", "path": "/flaky", "app": app})
    assert plan.breaker is not None
    assert plan.breaker.min_calls == 2
    assert (
        engine.plan_for({"type": "http", "method": "GET", "path": "/plain", "app": app}).breaker
        is None
    )  # the policy has no breaker: the override is per endpoint


async def test_deadline_decorator_caps_the_callers_deadline(clock: FakeClock) -> None:
    fidelity = Fidelity()
    app = with_middleware(build(fidelity), clock)
    async with client(app) as c:
        capped = await c.get("/slow", headers={"x-request-timeout-ms": "10000"})
        shorter = await c.get("/slow", headers={"x-request-timeout-ms": "400"})
        default = await c.get("/slow")
    assert capped.json()["remaining_s"] == pytest.approx(1.5)
    assert shorter.json()["remaining_s"] == pytest.approx(0.4)
    assert default.json()["remaining_s"] == pytest.approx(1.5)


async def test_policy_route_entry_and_decorator_merge(clock: FakeClock) -> None:
    from fidelity_mw import RouteConfig

    fidelity = Fidelity()
    policy = Policy(breaker=None, routes=(RouteConfig(match="/slow", name="slow-route"),))
    recorder = Recorder()
    app = with_middleware(build(fidelity), clock, policy=policy, observer=recorder)
    async with client(app) as c:
        answer = await c.get("/slow")
    assert answer.json()["remaining_s"] == pytest.approx(1.5)
    assert recorder.contexts[0].route == "slow-route"  # the policy entry names the route


# ---------------------------------------------------------------- without the middleware


async def test_route_class_enforces_breaker_and_deadline_on_its_own_engine(
    clock: FakeClock,
) -> None:
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock, rng=seeded_random(5))
    flaky_status = [500]
    app = build(fidelity, flaky_status=flaky_status)
    fidelity.install(app)
    async with client(app) as c:
        statuses = [(await c.get("/flaky")).status_code for _ in range(3)]
        shed = await c.get("/flaky")
        expired = await c.get("/slow", headers={"x-request-timeout-ms": "0"})
        capped = await c.get("/slow", headers={"x-request-timeout-ms": "9000"})
        clock.advance(5.0)
        flaky_status[0] = 200
        probe = await c.get("/flaky")
        after = await c.get("/flaky")
        limited = [(await c.get("/sync")).status_code for _ in range(2)]
    assert statuses == [500, 500, 503]
    assert shed.headers["content-type"] == PROBLEM
    assert shed.headers["retry-after"] == "5"
    assert shed.json()["type"] == "urn:fidelity-mw:problem:circuit-open"
    assert shed.json()["route"] == "/flaky"
    assert expired.status_code == 504
    assert expired.json()["type"] == "urn:fidelity-mw:problem:deadline-expired"
    assert capped.json()["remaining_s"] == pytest.approx(1.5)
    assert (probe.status_code, after.status_code) == (200, 200)  # the probe closed it
    assert limited == [200, 429]
    # each marked as a control decision, as the middleware's own answers are
    assert shed.headers["x-fidelity-decided-by"] == "breaker"
    assert expired.headers["x-fidelity-decided-by"] == "deadline"
    assert isinstance(fidelity.engine.store, MemoryStore)
    assert "/sync:1/min|127.0.0.1" in fidelity.engine.store.limits.tats


async def test_exceptions_are_http_exceptions_without_install(clock: FakeClock) -> None:
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    app = build(fidelity)  # no install: FastAPI's own HTTPException handler answers
    async with client(app) as c:
        await c.get("/sync")
        rejected = await c.get("/sync")
    assert rejected.status_code == 429
    assert rejected.headers["retry-after"] == "60"
    assert rejected.headers["x-fidelity-decided-by"] == "ratelimit"
    assert "rate limit" in rejected.json()["detail"]


async def test_app_handler_for_rate_limited_wins_over_the_default(clock: FakeClock) -> None:
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    app = build(fidelity)

    @app.exception_handler(RateLimited)
    async def mine(request: Request, exc: RateLimited) -> JSONResponse:
        return JSONResponse(
            {"mine": exc.decision.reason, "limit": exc.decision.subject},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    fidelity.install(app)
    async with client(app) as c:
        await c.get("/sync")
        rejected = await c.get("/sync")
    assert rejected.status_code == 429
    assert rejected.json() == {"mine": "over_limit", "limit": "/sync:1/min"}
    assert rejected.headers["retry-after"] == "60"


async def test_on_reject_shapes_the_dependency_rejection(clock: FakeClock) -> None:
    calls: list[str] = []

    def on_reject(ctx: DecisionContext, decision: Any) -> PlainTextResponse:
        calls.append(f"{decision.layer}/{ctx.route}")
        return PlainTextResponse("later", status_code=429)

    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock, on_reject=on_reject)
    app = build(fidelity)
    fidelity.install(app)
    async with client(app) as c:
        await c.get("/sync")
        rejected = await c.get("/sync")
    assert (rejected.status_code, rejected.text) == (429, "later")
    assert rejected.headers["retry-after"] == "60"  # kept: the hook did not set it
    assert calls == ["ratelimit//sync"]


async def test_shadow_limit_records_but_never_rejects(clock: FakeClock) -> None:
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    app = FastAPI()
    seen: list[DecisionContext] = []

    @app.get("/s", dependencies=[Depends(fidelity.limit("1/min", shadow=True))])
    async def s(request: Request) -> dict[str, str]:
        seen.append(request.state.fidelity)
        return {}

    async with client(app) as c:
        statuses = [(await c.get("/s")).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert [d.verdict for d in seen[2].decisions] == ["would_reject"]


async def test_a_route_template_outside_ascii_names_the_limit_in_its_fields_safely(
    clock: FakeClock,
) -> None:
    """The default limit name is the route template, which no policy check has seen: in
    the RateLimit fields it is an sf-string (printable ASCII, `"` escaped), never a 500
    for a character latin-1 cannot carry, nor a field a `"` breaks."""
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/日本/{x}", dependencies=[Depends(fidelity.limit("2/min"))])
    async def japanese(x: str) -> dict[str, str]:
        return {"x": x}

    @app.get('/q"uote', dependencies=[Depends(fidelity.limit("2/min"))])
    async def quoted() -> dict[str, str]:
        return {}

    app = with_middleware(app, clock)
    fidelity.install(app)
    async with client(app) as c:
        japanese_answers = [await c.get("/%E6%97%A5%E6%9C%AC/1") for _ in range(3)]
        quoted_answers = [await c.get("/q%22uote") for _ in range(3)]
    assert [r.status_code for r in japanese_answers] == [200, 200, 429]
    assert japanese_answers[0].headers["ratelimit"] == '"/??/{x}:2/min";r=1;t=30'
    assert japanese_answers[2].headers["ratelimit-policy"] == '"/??/{x}:2/min";q=2;w=60'
    assert japanese_answers[2].json()["limit"] == "/日本/{x}:2/min"  # JSON carries it whole
    assert [r.status_code for r in quoted_answers] == [200, 200, 429]
    assert quoted_answers[0].headers["ratelimit"] == '"/q\\"uote:2/min";r=1;t=30'


async def test_key_function_and_an_http_exception_of_the_app(clock: FakeClock) -> None:
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    app = FastAPI()

    def tenant(request: Request) -> str | None:
        return request.query_params.get("tenant")

    @app.get("/t", dependencies=[Depends(fidelity.limit("1/min", key=tenant, name="tenant"))])
    async def t() -> dict[str, str]:
        raise HTTPException(404)

    async with client(app) as c:
        a1 = await c.get("/t", params={"tenant": "a"})
        a2 = await c.get("/t", params={"tenant": "a"})
        b1 = await c.get("/t", params={"tenant": "b"})
    assert [a1.status_code, a2.status_code, b1.status_code] == [404, 429, 404]


# ---------------------------------------------------------------- OpenAPI and import


async def test_openapi_documents_the_rejections_of_each_route(clock: FakeClock) -> None:
    fidelity = Fidelity()
    app = with_middleware(build(fidelity, routed=False), clock)
    fidelity.install(app)
    async with client(app) as c:
        paths = (await c.get("/openapi.json")).json()["paths"]
    keyed = paths["/keyed/{item}"]["get"]["responses"]
    assert set(keyed) == {"200", "422", "429"}
    assert keyed["429"]["content"] == {PROBLEM: {"schema": PROBLEM_SCHEMA}}
    assert "Retry-After" in keyed["429"]["headers"]
    assert set(paths["/flaky"]["get"]["responses"]) == {"200", "503"}
    assert set(paths["/slow"]["get"]["responses"]) == {"200", "504"}
    assert set(paths["/plain"]["get"]["responses"]) == {"200"}


async def test_route_class_documents_503_and_504_on_every_route() -> None:
    fidelity = Fidelity()
    app = build(fidelity)
    async with client(app) as c:
        paths = (await c.get("/openapi.json")).json()["paths"]
    assert set(paths["/sync"]["get"]["responses"]) == {"200", "429", "503", "504"}
    assert set(paths["/plain"]["get"]["responses"]) == {"200"}  # not on the router


def test_bad_forms_fail_at_definition() -> None:
    fidelity = Fidelity()
    with pytest.raises(fidelity_mw.PolicyError):
        fidelity.limit("ten per second")
    with pytest.raises(fidelity_mw.PolicyError):
        fidelity.breaker(failure_ratio=2.0)
    with pytest.raises(ValueError, match="deadline"):
        fidelity.deadline(0)
    with pytest.raises(TypeError):
        fidelity.breaker(BreakerConfig(), min_calls=3)


def test_importing_fidelity_mw_does_not_import_fastapi() -> None:
    code = textwrap.dedent(
        """
        import sys
        import fidelity_mw
        print("fastapi" in sys.modules, "fidelity_mw.fastapi" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]


def test_rate_limit_policy_validation_matches_the_dependency() -> None:
    # the dependency is validated like a policy entry: same rate grammar, same limits
    assert RateLimit(rate="2/min").burst_size == Fidelity().limit("2/min").burst_size


async def test_middleware_names_included_router_routes_by_their_template(
    clock: FakeClock,
) -> None:
    # Recent FastAPI keeps an included router as one opaque route entry: the middleware
    # must still see "/v1/items/{id}" (it saw "!unmatched" before), nested prefixes too.
    inner = APIRouter(prefix="/items")

    @inner.get("/{id}")
    async def item(id: str) -> dict[str, str]:
        return {"id": id}

    outer = APIRouter(prefix="/v1")
    outer.include_router(inner)
    app = FastAPI()
    app.include_router(outer)
    recorder = Recorder()
    app = with_middleware(app, clock, observer=recorder)
    async with client(app) as c:
        assert (await c.get("/v1/items/7")).status_code == 200
        assert (await c.post("/v1/items/7")).status_code == 405
    assert [ctx.route for ctx in recorder.contexts] == ["/v1/items/{id}", "/v1/items/{id}"]


async def test_limit_dependency_fields_say_what_the_middleware_fields_say(
    clock: FakeClock,
) -> None:
    """The same rate as a dependency and as a policy limit: the same RateLimit fields
    at every step (`t` was the time until the bucket is full for the dependency, so a
    429 carried a `t` past its own Retry-After)."""
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/dep", dependencies=[Depends(fidelity.limit("3/min", name="n"))])
    async def dep() -> str:
        return "ok"

    @app.get("/mw")
    async def mw() -> str:
        return "ok"

    limit = RateLimit(name="n", match="/mw", rate="3/min")
    with_middleware(app, clock, policy=Policy(breaker=None, rate_limits=(limit,)))
    fidelity.install(app)

    async def fields(path: str) -> list[tuple[int, str, str | None]]:
        out = []
        async with client(app) as c:
            for step in range(5):
                if step == 4:
                    clock.advance(7.5)
                r = await c.get(path)
                out.append((r.status_code, r.headers["ratelimit"], r.headers.get("retry-after")))
        return out

    from_dependency = await fields("/dep")
    clock.advance(3600)
    assert await fields("/mw") == from_dependency
    assert from_dependency[3] == (429, '"n";r=0;t=20', "20")
    assert from_dependency[4] == (429, '"n";r=0;t=13', "13")
