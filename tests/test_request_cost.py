"""A per-request cost for `Depends(fidelity.limit(..., cost=fn))` (slowapi's `cost=`
callable, limits' `hit(cost=)`), bounded by the burst and on the record; and key
functions that are coroutine functions (an auth lookup)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request

from fidelity_mw import (
    DecisionContext,
    FidelityMiddleware,
    Policy,
    PolicyError,
    RateLimit,
    check_limits,
)
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.contexts: list[DecisionContext] = []

    def start(self, ctx: DecisionContext, scope: Any) -> None:
        return None

    def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.contexts.append(ctx)


async def batch_size(request: Request) -> int:
    """A batch costs one unit per item (FastAPI keeps the body for the endpoint)."""
    return len(await request.json())


def batch_app(
    clock: FakeClock, *, shadow: bool = False, cost: Any = batch_size
) -> tuple[FastAPI, Recorder, MemoryStore]:
    fidelity = Fidelity()
    limit = fidelity.limit("10/min", burst=10, cost=cost, name="items", shadow=shadow)
    app = FastAPI()

    @app.post("/batch", dependencies=[Depends(limit)])
    async def batch(items: list[int]) -> dict[str, int]:
        return {"stored": len(items)}

    recorder = Recorder()
    store = MemoryStore(rng=seeded_random(1))
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(breaker=None),
        clock=clock,
        store=store,
        observer=recorder,
        telemetry=False,
    )
    fidelity.install(app)
    return app, recorder, store


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def limit_decision(ctx: DecisionContext) -> tuple[str, str, dict[str, Any]]:
    (decision,) = [d for d in ctx.decisions if d.layer == "ratelimit"]
    return decision.verdict, decision.reason, dict(decision.details or {})


async def test_a_batch_takes_one_unit_per_item(clock: FakeClock) -> None:
    app, recorder, _ = batch_app(clock)
    async with client(app) as c:
        four = await c.post("/batch", json=[1, 2, 3, 4])
        five = await c.post("/batch", json=[1, 2, 3, 4, 5])
        two = await c.post("/batch", json=[1, 2])  # 1 unit left: refused
        one = await c.post("/batch", json=[1])  # the last unit
    assert [r.status_code for r in (four, five, two, one)] == [200, 200, 429, 200]
    assert four.json() == {"stored": 4}  # the endpoint still read the body
    assert four.headers["ratelimit"].startswith('"items";r=6;')
    assert five.headers["ratelimit"].startswith('"items";r=1;')
    assert two.json()["type"] == "urn:fidelity-mw:problem:rate-limited"
    assert two.headers["retry-after"] == "6"  # one more unit at 10/min
    assert limit_decision(recorder.contexts[0]) == (
        "allow",
        "under_limit",
        {"remaining": 6, "cost": 4},
    )
    assert limit_decision(recorder.contexts[2])[:2] == ("reject", "over_limit")
    assert limit_decision(recorder.contexts[2])[2]["cost"] == 2


async def test_a_cost_above_the_burst_is_refused_at_once_and_says_why(clock: FakeClock) -> None:
    app, recorder, store = batch_app(clock)
    async with client(app) as c:
        huge = await c.post("/batch", json=list(range(11)))
        fits = await c.post("/batch", json=list(range(10)))
    assert huge.status_code == 429
    body = huge.json()
    assert body["type"] == "urn:fidelity-mw:problem:cost-over-burst"
    assert (body["cost"], body["burst"], body["limit"]) == (11, 10, "items")
    assert "retry-after" not in huge.headers  # waiting never admits it
    assert huge.headers["ratelimit-policy"] == '"items";q=10;w=60'
    assert limit_decision(recorder.contexts[0]) == (
        "reject",
        "cost_over_burst",
        {"cost": 11, "burst": 10},
    )
    assert recorder.contexts[0].decided_by == "ratelimit"
    # it took nothing: the whole burst is still there for a batch that fits
    assert fits.status_code == 200
    assert fits.headers["ratelimit"].startswith('"items";r=0;')
    assert len(store.limits.tats) == 1


async def test_a_shadow_limit_only_records_a_cost_above_the_burst(clock: FakeClock) -> None:
    app, recorder, store = batch_app(clock, shadow=True)
    async with client(app) as c:
        huge = await c.post("/batch", json=list(range(11)))
    assert huge.status_code == 200
    verdict, reason, details = limit_decision(recorder.contexts[0])
    assert (verdict, reason, details["cost"], details["shadow"]) == (
        "would_reject",
        "cost_over_burst_shadow",
        11,
        True,
    )
    assert not store.limits.tats


async def test_an_empty_batch_takes_nothing(clock: FakeClock) -> None:
    app, recorder, store = batch_app(clock)
    async with client(app) as c:
        empty = await c.post("/batch", json=[])
    assert empty.status_code == 200
    assert limit_decision(recorder.contexts[0]) == ("allow", "zero_cost", {"cost": 0})
    assert not store.limits.tats


@pytest.mark.parametrize("bad", [-1, "3", True, 2.5])
async def test_a_cost_that_is_no_whole_number_costs_the_burst_and_names_the_limit(
    clock: FakeClock, bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The app's bug, said in an ERROR naming the limit; the request costs the burst, as
    the middleware's own limits charge it (it was a ValueError: a 500 of ours)."""
    app, recorder, _ = batch_app(clock, cost=lambda request: bad)
    async with client(app) as c:
        first = await c.post("/batch", json=[1])
        second = await c.post("/batch", json=[1])
    assert (first.status_code, second.status_code) == (200, 429)  # the whole burst, once
    assert limit_decision(recorder.contexts[0])[2]["cost"] == 10
    said = [r for r in caplog.records if "the cost function of 'items' returned" in r.getMessage()]
    assert said
    assert said[0].levelname == "ERROR"


async def test_a_plain_cost_function_without_the_middleware(clock: FakeClock) -> None:
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    app = FastAPI()

    def weight(request: Request) -> int:
        return int(request.query_params.get("n", "1"))

    @app.get("/w", dependencies=[Depends(fidelity.limit("3/min", cost=weight))])
    async def w() -> dict[str, str]:
        return {"ok": "yes"}

    fidelity.install(app)
    async with client(app) as c:
        statuses = [(await c.get("/w", params={"n": n})).status_code for n in (2, 2, 1, 4)]
    assert statuses == [200, 429, 200, 429]


async def test_a_key_function_may_be_a_coroutine_function(clock: FakeClock) -> None:
    """An async key (a token looked up) limits per awaited key: it was used unawaited,
    every request a new key (the coroutine's repr), so the limit never applied."""
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    app = FastAPI()

    async def user(request: Request) -> str | None:
        return request.headers.get("authorization")

    @app.get("/me", dependencies=[Depends(fidelity.limit("2/min", key=user))])
    async def me() -> dict[str, str]:
        return {"ok": "yes"}

    fidelity.install(app)
    async with client(app) as c:
        alice = [(await c.get("/me", headers={"authorization": "a"})).status_code for _ in "123"]
        bob = (await c.get("/me", headers={"authorization": "b"})).status_code
    assert alice == [200, 200, 429]
    assert bob == 200
    assert set(fidelity.engine.store.limits.tats) == {"/me:2/min|k:a", "/me:2/min|k:b"}  # type: ignore[attr-defined]


# ---------------------------------------------------------------- check without counting


def export_app(clock: FakeClock) -> tuple[FastAPI, MemoryStore]:
    """POST /api/export: 2/min per client (a policy limit); GET /quota: a UI hint."""
    app = FastAPI()
    policy = Policy(
        breaker=None,
        rate_limits=(
            RateLimit(name="exports", match="/api/export", methods=("POST",), rate="2/min"),
            RateLimit(name="all", match="/api/*", rate="100/min"),
        ),
    )

    @app.post("/api/export")
    async def export() -> dict[str, bool]:
        return {"exported": True}

    @app.get("/quota")
    async def quota(request: Request, n: int | None = None) -> dict[str, Any]:
        check = await check_limits(request, path="/api/export", method="POST", cost=n)
        return {
            "allowed": check.allowed,
            "retry_after_s": check.retry_after_s,
            "limits": {s.name: [s.allowed, s.remaining, s.reason] for s in check.limits},
            "source": check.source,
        }

    store = MemoryStore(rng=seeded_random(1))
    app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, store=store, telemetry=False)
    return app, store


async def test_check_limits_answers_for_another_route_and_counts_nothing(
    clock: FakeClock,
) -> None:
    app, store = export_app(clock)
    async with client(app) as c:
        hints = [(await c.get("/quota")).json() for _ in range(5)]  # counted nowhere
        assert not store.limits.tats
        assert hints[0] == {
            "allowed": True,
            "retry_after_s": 0.0,
            "limits": {"exports": [True, 2, "under_limit"], "all": [True, 100, "under_limit"]},
            "source": "memory",
        }
        assert [(await c.post("/api/export")).status_code for _ in range(2)] == [200, 200]
        empty = (await c.get("/quota")).json()
        assert empty["allowed"] is False
        assert empty["retry_after_s"] == pytest.approx(30.0)
        assert empty["limits"]["exports"] == [False, 0, "over_limit"]
        assert (await c.post("/api/export")).status_code == 429  # as the check said
        clock.advance(30.0)
        assert (await c.get("/quota")).json()["allowed"] is True
        assert (await c.post("/api/export")).status_code == 200
        # a request of 3 units never fits a burst of 2
        big = (await c.get("/quota", params={"n": 3})).json()
        assert big["limits"]["exports"] == [False, 0, "cost_over_burst"]
        assert big["retry_after_s"] is None  # infinite (JSON has no infinity: null)


async def test_check_limits_needs_the_middleware() -> None:
    app = FastAPI()

    @app.get("/q")
    async def q(request: Request) -> None:
        await check_limits(request)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        with pytest.raises(RuntimeError, match="went through FidelityMiddleware"):
            await c.get("/q")


async def test_a_dependency_limit_checks_without_counting(clock: FakeClock) -> None:
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    app = FastAPI()
    batches = fidelity.limit("10/min", burst=10, cost=batch_size)

    @app.post("/batch", dependencies=[Depends(batches)])
    async def batch(items: list[int]) -> dict[str, int]:
        return {"stored": len(items)}

    @app.get("/room")
    async def room(request: Request, n: int) -> dict[str, Any]:
        check = await batches.check(request, cost=n, route="/batch")
        (status,) = check.limits
        return {
            "allowed": check.allowed,
            "remaining": status.remaining,
            "wait": check.retry_after_s,
        }

    fidelity.install(app)
    async with client(app) as c:
        assert (await c.get("/room", params={"n": 10})).json() == {
            "allowed": True,
            "remaining": 10,
            "wait": 0.0,
        }
        assert (await c.post("/batch", json=list(range(7)))).status_code == 200
        assert (await c.get("/room", params={"n": 3})).json()["allowed"] is True
        assert (await c.get("/room", params={"n": 3})).json()["remaining"] == 3  # not spent
        four = (await c.get("/room", params={"n": 4})).json()
        assert (four["allowed"], four["wait"]) == (False, pytest.approx(6.0))
        assert (await c.post("/batch", json=list(range(4)))).status_code == 429
        assert (await c.post("/batch", json=list(range(3)))).status_code == 200


class Unreachable(MemoryStore):
    async def peek(self, limit_keys: Any, limits: Any, now: float) -> Any:
        raise ConnectionError("redis away")


@pytest.mark.parametrize(("on_error", "allowed"), [("closed", False), ("local", True)])
async def test_a_check_whose_store_fails_answers_as_on_error_says(
    clock: FakeClock, on_error: str, allowed: bool
) -> None:
    fidelity = Fidelity(
        policy=Policy.from_dict({"state": {"on_error": on_error}, "breaker": False}),
        clock=clock,
        store=Unreachable(),
    )
    app = FastAPI()
    limit = fidelity.limit("1/min", name="one")

    @app.get("/hint")
    async def hint(request: Request) -> dict[str, Any]:
        check = await limit.check(request)
        return {"allowed": check.allowed, "reason": check.limits[0].reason}

    async with client(app) as c:
        answer = (await c.get("/hint")).json()
    assert answer == {"allowed": allowed, "reason": "state_error:ConnectionError"}


def test_a_bad_form_names_the_form_and_the_field() -> None:
    fidelity = Fidelity()
    with pytest.raises(PolicyError) as limit_error:
        fidelity.limit("10/fortnight")
    assert [issue.path for issue in limit_error.value.issues] == [
        "fidelity.limit('10/fortnight').rate"
    ]
    with pytest.raises(PolicyError) as breaker_error:
        fidelity.breaker(failure_ratio=2)
    assert [issue.path for issue in breaker_error.value.issues] == [
        "fidelity.breaker.failure_ratio"
    ]


# ---------------------------------------------------------------- a key from a dependency


async def test_a_key_from_a_dependency_counts_per_user_whatever_the_order(
    clock: FakeClock,
) -> None:
    """`key=Depends(current_user)`: FastAPI resolves the user once per request (the
    endpoint's own `Depends(current_user)` gets the same call), and the limit counts
    per user although it runs before any other dependency of the route."""
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    app = FastAPI()
    lookups: list[str] = []

    async def current_user(request: Request) -> str:
        token = request.headers.get("authorization", "")
        if not token:
            raise HTTPException(401)
        lookups.append(token)
        return token

    per_user = fidelity.limit("2/min", key=Depends(current_user), name="per-user")

    @app.get("/me", dependencies=[Depends(per_user)])
    async def me(user: str = Depends(current_user)) -> dict[str, str]:
        return {"user": user}

    @app.get("/hint")
    async def hint(request: Request, user: str = Depends(current_user)) -> dict[str, Any]:
        check = await per_user.check(request, identity=user)
        return {"allowed": check.allowed, "remaining": check.limits[0].remaining}

    fidelity.install(app)
    async with client(app) as c:
        ann = [(await c.get("/me", headers={"authorization": "ann"})).status_code for _ in "123"]
        bob = await c.get("/me", headers={"authorization": "bob"})
        anonymous = await c.get("/me")
        hint_ann = (await c.get("/hint", headers={"authorization": "ann"})).json()
    assert ann == [200, 200, 429]
    assert bob.json() == {"user": "bob"}
    assert anonymous.status_code == 401  # no user: nothing counted
    assert hint_ann == {"allowed": False, "remaining": 0}
    assert lookups == ["ann", "ann", "ann", "bob", "ann"]  # once per request
    assert set(fidelity.engine.store.limits.tats) == {"per-user|k:ann", "per-user|k:bob"}  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="identity="):
        await per_user.check(Request({"type": "http", "headers": [], "state": {}}))


# ---------------------------------------------------------------- the middleware's own limits
# `RateLimit(cost=fn)`: a plain Starlette app (no Depends) says what a request costs.


async def body_items(request: Any) -> int:
    """A batch costs one unit per item: the body read before the app, which reads it again."""
    return len(await request.json())


def header_units(request: Any) -> int:
    """What the gateway says the request costs (request is a Starlette Request, and the
    scope as a Mapping)."""
    return int(request.headers.get("x-units", "1"))


def starlette_app(
    policy: Policy, clock: FakeClock | None = None, store: Any = None
) -> tuple[Any, Recorder]:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def batch(request: Any) -> JSONResponse:
        return JSONResponse({"stored": len(await request.json())})

    async def plain(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/batch", batch, methods=["POST"]), Route("/plain", plain)])
    recorder = Recorder()
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        clock=clock,
        store=store,
        observer=recorder,
        telemetry=False,
    )
    return app, recorder


def batch_policy(cost: Any = body_items, **extra: Any) -> Policy:
    return Policy(
        breaker=None,
        rate_limits=[
            RateLimit(name="items", rate="10/min", burst=10, cost=cost, match="/batch", **extra)
        ],
    )


async def test_a_middleware_limit_takes_the_cost_its_function_reads_from_the_body(
    clock: FakeClock,
) -> None:
    store = MemoryStore(rng=seeded_random(1))
    app, recorder = starlette_app(batch_policy(), clock, store)
    async with client(app) as c:
        four = await c.post("/batch", json=[1, 2, 3, 4])
        five = await c.post("/batch", json=[1, 2, 3, 4, 5])
        two = await c.post("/batch", json=[1, 2])  # 1 unit left: refused
        one = await c.post("/batch", json=[1])  # the last unit
    assert [r.status_code for r in (four, five, two, one)] == [200, 200, 429, 200]
    assert four.json() == {"stored": 4}  # the app read the body the function read
    assert four.headers["ratelimit"].startswith('"items";r=6;')
    assert five.headers["ratelimit"].startswith('"items";r=1;')
    assert two.headers["retry-after"] == "6"  # one more unit at 10/min
    assert two.json()["type"] == "urn:fidelity-mw:problem:rate-limited"
    assert limit_decision(recorder.contexts[0]) == (
        "allow",
        "under_limit",
        {"remaining": 6, "cost": 4},
    )
    verdict, reason, details = limit_decision(recorder.contexts[2])
    assert (verdict, reason, details["cost"]) == ("reject", "over_limit", 2)


async def test_a_middleware_cost_from_a_gateway_header(clock: FakeClock) -> None:
    app, recorder = starlette_app(batch_policy(header_units), clock)
    async with client(app) as c:
        seven = await c.post("/batch", json=[], headers={"x-units": "7"})
        four = await c.post("/batch", json=[], headers={"x-units": "4"})
        three = await c.post("/batch", json=[], headers={"x-units": "3"})
    assert [r.status_code for r in (seven, four, three)] == [200, 429, 200]
    assert limit_decision(recorder.contexts[1])[2]["cost"] == 4


async def test_a_middleware_cost_above_the_burst_is_refused_at_once(clock: FakeClock) -> None:
    store = MemoryStore(rng=seeded_random(1))
    app, recorder = starlette_app(batch_policy(), clock, store)
    async with client(app) as c:
        big = await c.post("/batch", json=list(range(11)))
        after = await c.post("/batch", json=list(range(10)))  # nothing was taken
    assert big.status_code == 429
    assert "retry-after" not in big.headers  # waiting never admits it
    problem = big.json()
    assert problem["type"] == "urn:fidelity-mw:problem:cost-over-burst"
    assert (problem["limit"], problem["cost"], problem["burst"]) == ("items", 11, 10)
    assert big.headers["ratelimit-policy"] == '"items";q=10;w=60'
    assert limit_decision(recorder.contexts[0]) == (
        "reject",
        "cost_over_burst",
        {"cost": 11, "burst": 10},
    )
    assert recorder.contexts[0].decided_by == "ratelimit"
    assert after.status_code == 200


async def test_a_middleware_shadow_limit_records_a_cost_above_the_burst(clock: FakeClock) -> None:
    app, recorder = starlette_app(batch_policy(shadow=True), clock)
    async with client(app) as c:
        big = await c.post("/batch", json=list(range(11)))
    assert big.status_code == 200
    assert limit_decision(recorder.contexts[0]) == (
        "would_reject",
        "cost_over_burst_shadow",
        {"cost": 11, "burst": 10, "shadow": True},
    )


async def test_a_middleware_cost_of_zero_does_not_ask_the_store(clock: FakeClock) -> None:
    store = MemoryStore(rng=seeded_random(1))
    app, recorder = starlette_app(batch_policy(), clock, store)
    async with client(app) as c:
        empty = await c.post("/batch", json=[])
    assert empty.status_code == 200
    assert empty.json() == {"stored": 0}
    assert "ratelimit" not in empty.headers  # no limit was asked
    assert limit_decision(recorder.contexts[0]) == ("allow", "zero_cost", {"cost": 0})
    assert not (await store.snapshot(clock.monotonic())).limiter_keys


@pytest.mark.parametrize("bad", [lambda r: 1 / 0, lambda r: "three", lambda r: -1])
async def test_a_middleware_cost_function_that_fails_charges_the_burst(
    clock: FakeClock, bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app, recorder = starlette_app(batch_policy(bad), clock)
    async with client(app) as c:
        first = await c.post("/batch", json=[1])
        second = await c.post("/batch", json=[1])
    assert (first.status_code, second.status_code) == (200, 429)  # the whole burst, once
    assert limit_decision(recorder.contexts[0])[2]["cost"] == 10
    assert "the cost function of 'items'" in caplog.text


async def test_an_async_middleware_cost_function_is_awaited(clock: FakeClock) -> None:
    async def lookup(request: Any) -> int:
        return 6

    app, _ = starlette_app(batch_policy(lookup), clock)
    async with client(app) as c:
        statuses = [(await c.post("/batch", json=[])).status_code for _ in range(2)]
    assert statuses == [200, 429]


async def test_a_middleware_refund_gives_back_what_the_request_cost(clock: FakeClock) -> None:
    """The router's trailing-slash redirect gives `charge = "served"` limits their units
    back: the request's cost, not the limit's constant."""
    policy = Policy(
        breaker=None,
        rate_limits=[RateLimit(name="items", rate="10/min", burst=10, cost=body_items)],
    )
    app, _ = starlette_app(policy, clock)
    async with client(app) as c:
        redirected = await c.post("/batch/", json=list(range(8)), follow_redirects=False)
        full = await c.post("/batch", json=list(range(10)))
    assert redirected.status_code == 307
    assert full.status_code == 200  # the 8 units came back


async def test_routes_with_constant_costs_keep_the_common_step(clock: FakeClock) -> None:
    """A policy with a cost function elsewhere costs a constant-cost route nothing:
    its plan admits at the middleware's common step."""
    policy = Policy(
        breaker=None,
        rate_limits=[
            RateLimit(name="items", rate="10/min", cost=body_items, match="/batch"),
            RateLimit(name="plain", rate="10/min", match="/plain"),
        ],
    )
    app, _ = starlette_app(policy, clock)
    async with client(app) as c:
        assert (await c.get("/plain")).status_code == 200
        assert (await c.post("/batch", json=[1])).status_code == 200
    engine = app.middleware_stack.app.engine  # type: ignore[union-attr]
    plain = engine._plans[("GET", "/plain")]
    batch = engine._plans[("POST", "/batch")]
    assert plain.cost_fns is None
    assert plain.admits
    assert batch.cost_fns is not None
    assert not batch.admits
    assert list(batch.costed) == [(1,)]


async def test_check_limits_applies_a_middleware_cost_function(clock: FakeClock) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def quota(request: Any) -> JSONResponse:
        check = await check_limits(request, path="/batch", method="POST")
        return JSONResponse({"allowed": check.allowed, "cost": check.limits[0].cost})

    app = Starlette(routes=[Route("/quota", quota)])
    app.add_middleware(
        FidelityMiddleware, policy=batch_policy(header_units), clock=clock, telemetry=False
    )
    async with client(app) as c:
        answer = await c.get("/quota", headers={"x-units": "11"})
    assert answer.json() == {"allowed": False, "cost": 11}


def test_a_cost_function_is_python_only_and_a_file_says_so() -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"rate_limit": [{"name": "a", "cost": "app.costs:units"}]})
    assert "rate_limit[0].cost" in str(caught.value)
    assert "a policy file cannot name" in str(caught.value)
    # a function's cost is bounded per request, not at load
    limit = RateLimit(rate="5/min", cost=header_units)
    assert limit.cost_fn is header_units
    assert limit.fixed_cost == 1
    assert "callable:" in Policy(rate_limits=[limit]).to_dict()["rate_limit"][0]["cost"]


# the same costed requests through the middleware on every store: memory, Redis, tiered;
# "/batch/" is the router's trailing-slash redirect, which gives the cost back
COSTED_SEQUENCE = (
    ("/batch", 4), ("/batch/", 5), ("/batch", 5), ("/batch", 2), ("/batch", 1),
    ("/batch", 11), ("/batch", 0), ("/batch", 3),
)  # fmt: skip


async def costed_run(url: str) -> list[tuple[int, str | None]]:
    import uuid

    from fidelity_mw.policy import StateConfig
    from redis_server import PATIENT, QUIET

    state = StateConfig(url=url, key_prefix=f"cost-{uuid.uuid4().hex[:8]}", **PATIENT, **QUIET)
    policy = Policy(
        breaker=None,
        state=state,
        rate_limits=[RateLimit(name="items", rate="10/min", burst=10, cost=body_items)],
    )
    app, _ = starlette_app(policy)
    seen = []
    try:
        async with client(app) as c:
            for path, n in COSTED_SEQUENCE:
                answer = await c.post(path, json=list(range(n)), follow_redirects=False)
                remaining = answer.headers.get("ratelimit")
                seen.append((answer.status_code, remaining and remaining.split(";")[1]))
    finally:
        await app.middleware_stack.app.engine.aclose()  # type: ignore[union-attr]
    return seen


@pytest.mark.redis
async def test_a_middleware_cost_is_the_same_on_every_store(redis_url: str) -> None:
    memory = await costed_run("memory://")
    assert memory == [
        (200, "r=6"),
        (307, "r=1"),  # charged 5, then given back
        (200, "r=1"),
        (429, "r=1"),
        (200, "r=0"),
        (429, None),  # above the burst: refused before any store
        (200, None),  # 0: no store asked
        (429, "r=0"),
    ]
    assert await costed_run(redis_url) == memory
    tiered = await costed_run("tiered+" + redis_url)
    assert [status for status, _ in tiered] == [status for status, _ in memory]


def test_the_map_says_a_middleware_limit_costs_what_its_function_says() -> None:
    from fidelity_mw.tools.statemap import layers_for

    policy = Policy(
        rate_limits=[
            RateLimit(name="items", rate="10/min", cost=body_items),
            RateLimit(name="pairs", rate="10/min", cost=2),
        ]
    )
    data = [layer.data for layer in layers_for(policy) if layer.layer == "ratelimit"]
    assert "cost per request from a function (body_items)" in data[0]
    assert "cost 2 per request" in data[1]


async def test_a_middleware_cost_read_from_the_body_reaches_the_app_when_the_store_fails(
    clock: FakeClock,
) -> None:
    class Failing(MemoryStore):
        async def admit(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("redis away")

    store = Failing(rng=seeded_random(1))
    store.admit_now = None  # type: ignore[assignment]
    app, recorder = starlette_app(batch_policy(), clock, store)
    async with client(app) as c:
        answer = await c.post("/batch", json=[1, 2, 3])
    assert answer.status_code == 200
    assert answer.json() == {"stored": 3}  # the body the function read, again
    reasons = [d.reason for d in recorder.contexts[0].decisions if d.layer == "ratelimit"]
    assert reasons == ["state_error:ConnectionError"]
