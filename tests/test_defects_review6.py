"""Defects a sixth review found.

1. The route bulkhead, shared by event loops in several threads: a request refused for a
   full bulkhead queued itself a moment later, and a slot freed by a request on another
   thread in between found no waiter to go to; the request then waited beside a free slot
   for the next release, or its whole queue timeout and a 503.
2. Two FidelityMiddleware on one request's way (each charging its limits) were silent
   at run time.
3. A policy table with an unknown key was not checked further: its other errors showed
   only once the typo was fixed.
4. A bulkhead with `shed_stale` and a `tolerance` that is not a number: the cross-check
   compared it with 1.0 and raised TypeError, losing the field's own message.
5. `Depends(fidelity.limit(...))` let a store failure (Redis away under
   `on_error = "closed"`) escape as the app's 500, where the middleware answers 503
   `state-unavailable` for its own limits ("closed") or lets the request on (otherwise).
6. An upstream `Retry-After` such as "1².5" (non-ASCII digits, which `str.isdigit`
   accepts and `float` refuses) raised ValueError out of the outbound call.
7. The FastAPI route class without the middleware read only the first line of a
   repeated deadline header: a longer deadline than the caller's hops allowed.
8. The same route class let a store failure on the breaker's admission out as a 500,
   where the middleware decides it per `state.on_error`.
9. The limit dependency read only the first line of a repeated X-Forwarded-For: behind
   a proxy that adds a line of its own, the client's line chose its rate-limit key.
10. The state page listed a fleet share's key (a Redis outage, `on_error = "local"`)
    under its internal prefix as the limit's name, with no use shown.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.context import QUEUED
from fidelity_mw.decide.concurrency import DEFAULT, ConcurrencyLimiter, ConcurrencySpec
from fidelity_mw.errors import PolicyError, StateUnavailable
from fidelity_mw.policy import ConcurrencyConfig, StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT
from test_bulkhead import Service, concurrency_decisions

# ------------------------------------- 1. a slot freed between the refusal and the queue


def test_a_slot_freed_after_the_refusal_is_taken_when_the_request_queues() -> None:
    limiter = ConcurrencyLimiter(ConcurrencySpec(limit=1, max_queue=4))
    assert limiter.try_acquire(DEFAULT).admitted
    refused = limiter.try_acquire(DEFAULT)
    assert (refused.admitted, refused.reason) == (False, "at_limit")
    assert limiter.release() == []  # another thread's request ends: nobody waits yet
    assert limiter.enqueue(DEFAULT, "late") is True  # the free slot, not the queue
    assert (limiter.in_flight, limiter.waiting) == (1, 0)
    assert limiter.release() == []
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


def test_a_paced_request_queues_though_a_slot_is_free() -> None:
    """Pacing refuses with room left on purpose: such a request waits its turn."""
    limiter = ConcurrencyLimiter(ConcurrencySpec(limit=4, max_queue=4))
    assert limiter.enqueue(DEFAULT, "paced", paced=True) is False
    assert (limiter.in_flight, limiter.waiting) == (0, 1)


def test_a_queued_request_does_not_overtake_a_better_waiter_through_a_freed_slot() -> None:
    limiter = ConcurrencyLimiter(ConcurrencySpec(limit=1, max_queue=4))
    assert limiter.try_acquire(DEFAULT).admitted
    assert limiter.enqueue("critical", "first") is False
    assert limiter.enqueue(DEFAULT, "second") is False
    assert limiter.release() == ["first"]


@pytest.mark.anyio
async def test_a_request_refused_as_another_threads_request_ends_takes_its_slot(
    clock: FakeClock,
) -> None:
    """One slot, held by a request served on another thread's loop, which ends right
    after this request was refused and before it queued (the plant below): this request
    is served, its record says it got a freed slot, and nothing stays held or queued.
    Before the fix it waited out its queue timeout and got a 503."""
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=4, queue_timeout_ms=2000)
    )
    svc = Service(policy, clock)
    assert (await svc.client.get("/w")).status_code == 200  # the route's bulkhead is made
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.try_acquire(DEFAULT).admitted  # the other thread's request
    bulkheads = svc.mw._bulkheads
    refusals: list[Any] = []
    enter_now = bulkheads.enter_now

    def refused_then_freed(*args: Any) -> Any:
        entered = enter_now(*args)
        refusals.append(entered)
        limiter.release()  # the other thread's request ends here
        return entered

    bulkheads.enter_now = refused_then_freed
    response = await svc.client.get("/w")
    (entered,) = refusals
    assert entered is not None  # refused for now ...
    assert not isinstance(entered, tuple)  # ... to queue, not shed
    assert response.status_code == 200
    (decision,) = concurrency_decisions(svc.contexts[-1])
    assert (decision.verdict, decision.reason) == (QUEUED, "slot_freed")
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


# ------------------------------------------- 2. two FidelityMiddleware on one request


def _stack(middlewares: int) -> Any:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app: Any = ok
    for _ in range(middlewares):
        app = FidelityMiddleware(app, policy=Policy(), telemetry=False)
    return app


@pytest.mark.anyio
@pytest.mark.parametrize("middlewares", [1, 2])
async def test_a_request_through_two_fidelity_middlewares_is_said_once(
    middlewares: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Only `fidelity-mw map` said so: a service that added the middleware twice (in the
    app and again in a mounted sub-app, say) had every limit charged twice, silently."""
    transport = httpx.ASGITransport(app=_stack(middlewares))
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
            for _ in range(3):
                assert (await client.get("/")).status_code == 200
    said = [r for r in caplog.records if "two FidelityMiddleware" in r.getMessage()]
    assert len(said) == (1 if middlewares == 2 else 0)


# ------------------------------- 3. an unknown key hid the other problems of its table


def _issues(data: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(data)
    return sorted(str(i) for i in caught.value.issues)


def test_a_table_with_an_unknown_key_still_has_its_other_keys_checked() -> None:
    """One run of `check` names every problem: the typo and the bad value beside it (the
    value's error used to appear only once the typo was fixed)."""
    found = _issues({"breaker": {"failure_ratio": 2, "typo": 1}})
    assert found[0] == "breaker.failure_ratio: 2 is out of range: allowed > 0.0 and <= 1.0"
    assert found[1].startswith("breaker.typo: unknown key")
    assert len(found) == 2
    found = _issues({"upstream": [{"host": "a.internal", "retry": {"attempts": 0, "x": 1}}]})
    assert found[0] == "upstream[0].retry.attempts: 0 is out of range: allowed between 1 and 10"
    assert found[1].startswith("upstream[0].retry.x: unknown key")
    assert len(found) == 2


def test_an_unknown_top_level_key_leaves_the_policys_own_checks_to_run_once() -> None:
    data = {"bogus": 1, "trusted_peers": 5, "rate_limit": [{"name": "a"}, {"name": "a"}]}
    found = _issues(data)
    assert found[0].startswith("bogus: unknown key")
    assert found[1].startswith('rate_limit[1].name: "a" is already the name of rate_limit[0]')
    assert found[2].startswith("trusted_peers: expected a list")
    assert len(found) == 3


def test_a_table_whose_inner_table_failed_adds_no_guess_about_it() -> None:
    """A route whose breaker table is broken is not rebuilt with a default breaker (which
    could raise cross-checks about a breaker the file does not have): only the real ones."""
    found = _issues({"route": [{"match": "/a", "x": 1, "breaker": {"failure_ratio": 7}}]})
    assert found[0].startswith("route[0].breaker.failure_ratio: 7 is out of range")
    assert found[1].startswith("route[0].x: unknown key")
    assert len(found) == 2


# --------------------- 4. a cross-check that compared a value its own check had refused


def test_a_shed_stale_bulkhead_with_a_tolerance_that_is_not_a_number_names_the_field() -> None:
    """`tolerance = "2"` beside `shed_stale = true` is the tolerance's error, said as such
    (the cross-check compared the string with 1.0: a TypeError, every other problem of the
    table lost, and `concurrency: '<=' not supported ...` as the only message)."""
    found = _issues(
        {"concurrency": {"adaptive": True, "shed_stale": True, "tolerance": "2", "limit": 0}}
    )
    assert found == [
        "concurrency.limit: 0 is out of range: allowed between 1 and 1000000",
        'concurrency.tolerance: expected a number, got string "2"',
    ]
    with pytest.raises(PolicyError) as caught:
        ConcurrencyConfig(adaptive=True, shed_stale=True, tolerance="2")  # type: ignore[arg-type]
    assert [i.path for i in caught.value.issues] == ["tolerance"]


# ------------------------- 5. a store failure in the limit dependency was the app's 500


class _Unreachable(MemoryStore):
    """A store whose every admission fails, as Redis's does when it is away and the
    policy says "closed"."""

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        raise StateUnavailable("redis is unreachable and state.on_error is 'closed'")


async def _limited_route(on_error: str, shadow: bool = False) -> tuple[httpx.Response, Any]:
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()
    app = FastAPI()
    seen: list[Any] = []

    @app.get("/x", dependencies=[Depends(fidelity.limit("5/min", shadow=shadow))])
    async def x() -> dict[str, int]:
        import fidelity_mw

        seen.append(fidelity_mw.current())
        return {"ok": 1}

    policy = Policy(breaker=None, state=StateConfig(on_error=on_error))  # type: ignore[arg-type]
    app.add_middleware(
        FidelityMiddleware, policy=policy, store=_Unreachable(), clock=FakeClock(), telemetry=False
    )
    fidelity.install(app)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.get("/x")
    return response, seen[0] if seen else None


@pytest.mark.anyio
async def test_a_limit_dependency_whose_store_is_away_fails_closed_with_the_policys_503() -> None:
    response, _ = await _limited_route("closed")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:fidelity-mw:problem:state-unavailable"
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-fidelity-decided-by"] == "state"  # (review 16)


@pytest.mark.anyio
@pytest.mark.parametrize(("on_error", "shadow"), [("local", False), ("closed", True)])
async def test_a_limit_dependency_whose_store_fails_lets_the_request_on_unless_closed(
    on_error: str, shadow: bool
) -> None:
    response, ctx = await _limited_route(on_error, shadow)
    assert response.status_code == 200
    decision = ctx.last("ratelimit")
    assert (decision.verdict, decision.reason) == ("allow", "state_error:StateUnavailable")
    assert decision.state_source == "fallback"


# ------------------- 6. a Retry-After with non-ASCII digits raised out of the call


@pytest.mark.parametrize("junk", ["1\u00b2.5", "\u00b2.5", "\u0661.\u0665"])
def test_a_retry_after_with_digits_outside_ascii_is_junk(junk: str) -> None:
    from fidelity_mw.decide.retry import parse_retry_after

    assert parse_retry_after(junk, 0.0) is None


@pytest.mark.anyio
async def test_an_upstream_retry_after_with_a_superscript_digit_is_ignored_not_raised() -> None:
    from fidelity_mw import FidelityTransport
    from fidelity_mw.engine import Engine
    from fidelity_mw.policy import RetryConfig, UpstreamConfig
    from fidelity_mw.testing import seeded_random

    clock = FakeClock()
    retry = RetryConfig(attempts=2, base_ms=1, max_ms=2)
    upstream_cfg = UpstreamConfig(host="plain", retry=retry, breaker=None)
    engine = Engine(Policy(upstreams=(upstream_cfg,)), clock=clock, rng=seeded_random(7))
    calls: list[int] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        # httpx reads a header that is not ASCII as UTF-8: "1².5"
        return httpx.Response(503, headers=[(b"retry-after", "1\u00b2.5".encode())])

    transport = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as http:
        response = await http.get("http://plain/pay")
    assert response.status_code == 503
    assert len(calls) == 2  # retried on its own backoff, the junk value ignored


# ------------- 7. the standalone route class read the first line of a repeated deadline


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("lines", "remaining"),
    [(["900000", "100"], 0.1), (["100", "900000"], 0.1), (["9000", "abc"], 1.5)],
)
async def test_the_route_class_alone_takes_the_shortest_of_a_repeated_deadline(
    lines: list[str], remaining: float
) -> None:
    """As the middleware does (test_defects_review5): the shortest line, and a malformed
    one makes the header malformed (the route's 1.5 s default then applies)."""
    from fastapi import APIRouter, FastAPI

    import fidelity_mw
    from fidelity_mw.fastapi import Fidelity

    clock = FakeClock()
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    router = APIRouter(route_class=fidelity.route_class)

    @router.get("/slow")
    @fidelity.deadline(1_500)
    async def slow() -> dict[str, float | None]:
        ctx = fidelity_mw.current()
        assert ctx is not None
        return {"remaining_s": ctx.remaining_s(clock.monotonic())}

    app = FastAPI()
    app.include_router(router)
    fidelity.install(app)
    headers = [("x-request-timeout-ms", line) for line in lines]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        got = await c.get("/slow", headers=headers)
    assert got.json()["remaining_s"] == pytest.approx(remaining)


# ------------- 8. the standalone route class let a store failure out as the app's 500


@pytest.mark.anyio
@pytest.mark.parametrize(("on_error", "status"), [("closed", 503), ("local", 200)])
async def test_the_route_class_alone_decides_a_store_failure_per_on_error(
    on_error: str, status: int
) -> None:
    from fastapi import APIRouter, FastAPI

    from fidelity_mw.fastapi import Fidelity
    from fidelity_mw.policy import BreakerConfig

    policy = Policy(breaker=BreakerConfig(), state=StateConfig(on_error=on_error))  # type: ignore[arg-type]
    fidelity = Fidelity(policy=policy, clock=FakeClock(), store=_Unreachable())
    router = APIRouter(route_class=fidelity.route_class)

    @router.get("/x")
    async def x() -> dict[str, int]:
        return {"ok": 1}

    app = FastAPI()
    app.include_router(router)
    fidelity.install(app)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        got = await c.get("/x")
    assert got.status_code == status
    if status == 503:
        assert got.json()["type"] == "urn:fidelity-mw:problem:state-unavailable"
        assert got.headers["x-fidelity-decided-by"] == "state"  # (review 16)


# ----------- 9. the limit dependency read the client's own X-Forwarded-For line alone


@pytest.mark.anyio
@pytest.mark.parametrize("middleware", [False, True])
async def test_a_client_cannot_pick_its_key_with_an_x_forwarded_for_line_of_its_own(
    middleware: bool,
) -> None:
    """A proxy (HAProxy's `option forwardfor`, say) adds its own X-Forwarded-For line
    after the client's: the client is the rightmost untrusted hop of all the lines."""
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    clock = FakeClock()
    policy = Policy(breaker=None, trusted_proxies=("127.0.0.0/8",))
    fidelity = Fidelity(policy=policy, clock=clock)
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("1/min"))])
    async def x() -> dict[str, int]:
        return {"ok": 1}

    if middleware:
        app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, telemetry=False)
    fidelity.install(app)
    transport = httpx.ASGITransport(app=app)  # the peer: 127.0.0.1, a trusted proxy
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        statuses = [
            (
                await c.get(
                    "/x", headers=[("x-forwarded-for", spoof), ("x-forwarded-for", "9.9.9.9")]
                )
            ).status_code
            for spoof in ("1.1.1.1", "2.2.2.2")
        ]
    assert statuses == [200, 429]  # one client, 9.9.9.9, whatever it wrote itself


# ------- 10. the state page named a fleet share's key by its internal prefix


def test_the_state_page_shows_a_fleet_shares_key_under_its_limit() -> None:
    """During a Redis outage each process counts its share of a limit on keys of its own
    ("share 1/N" + NUL + the key): the page listed the limit as that prefix and, finding
    no limit of that name, showed no use at all."""
    from fidelity_mw.admin.view import Since, render
    from fidelity_mw.engine import Engine
    from fidelity_mw.policy import RateLimit
    from fidelity_mw.state.fleet import Fleet
    from fidelity_mw.state.snapshot import LimiterKeyView, StoreSnapshot

    clock = FakeClock()
    limit = RateLimit(name="per-client", rate="60/min", burst=6)  # 1 unit per s, 6 at once
    engine = Engine(Policy(rate_limits=(limit,), breaker=None), clock=clock)
    spec = engine.plan_for({"type": "http", "path": "/", "method": "GET"}).specs[0]
    [key], _ = Fleet("fmw", 60.0).scaled(["per-client|203.0.113.9"], [spec], 3)
    snap = StoreSnapshot(
        "redis", "fallback", 1.0, limiter_keys=(LimiterKeyView(key, 3.0, "fallback", 1.0),)
    )
    [row] = render(engine, snap, clock.monotonic(), Since(), lambda k: "h")["limiter_keys"]
    assert row["limit"] == "per-client"
    assert row["fleet_share"] == "1/3"
    # the share's bucket: 1 unit per 3 s, 2 at once; 3 s of backlog is one unit in use
    assert (row["used"], row["burst"]) == (1.0, 2.0)


# ------------------------------------- 15. the state page and a value it cannot read


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_limiter_value_the_snapshot_cannot_read_is_left_out_not_a_500(
    redis_url: str,
) -> None:
    """Something else wrote under one of our limiter keys: `/state.json` (the snapshot)
    raised ValueError, a 500, and showed nothing; now that key is left out."""
    import redis as redis_sync

    from fidelity_mw.policy import StateConfig
    from fidelity_mw.state.base import LimitSpec
    from fidelity_mw.state.redis import RedisStore

    store = RedisStore(config=StateConfig(url=redis_url, key_prefix="odd-value", **PATIENT))
    spec = LimitSpec("per-client", 1.0, 5.0, 1, False)
    raw = redis_sync.Redis.from_url(redis_url)
    try:
        for who in ("k1", "k2"):
            await store.admit(None, None, [f"per-client|{who}"], [spec], 0.0)
        raw.set(store.key("rl", "per-client|k2"), b"\xffnot a number")
        snap = await store.snapshot(0.0, top=5)
    finally:
        raw.close()
        await store.aclose()
    assert snap.source == "redis"
    assert [k.key for k in snap.limiter_keys] == ["per-client|k1"]
