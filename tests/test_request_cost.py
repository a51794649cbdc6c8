"""A per-request cost for `Depends(fidelity.limit(..., cost=fn))` (slowapi's `cost=`
callable, limits' `hit(cost=)`), bounded by the burst and on the record; and key
functions that are coroutine functions (an auth lookup)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from fidelity_mw import DecisionContext, FidelityMiddleware, Policy
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
async def test_a_cost_that_is_no_whole_number_names_the_limit(clock: FakeClock, bad: Any) -> None:
    app, _, _ = batch_app(clock, cost=lambda request: bad)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        with pytest.raises(ValueError, match=r"fidelity.limit 'items': the cost function returned"):
            await c.post("/batch", json=[1])


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
