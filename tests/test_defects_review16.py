"""Review 16: what the operator sees (vis16); each test failed before its fix.

1. With `on_error = "closed"`, a refusal for want of the control state (Redis away)
   said `x-fidelity-decided-by: breaker` and was counted under `decided_by="breaker"`
   though no breaker was open. It now says `state`: in the header, the span, the
   metric, the FastAPI `fidelity.limit` answer and an outbound refusal the app let out;
   the record names the layer whose state failed and why (`state_error:<exception>`,
   `fallback_why`).
2. On state it cannot read (Redis), the breaker gauge listed an upstream breaker only
   once this process had seen it open; memory state lists every breaker it holds.
3. Nothing was logged at startup about the policy in use.
4. A `[[route]]` could not opt out of a policy-wide `[concurrency]`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import Engine, FidelityMiddleware, FidelityTransport, Policy, PolicyError
from fidelity_mw.context import Decision, DecisionContext
from fidelity_mw.errors import CircuitOpen, StateUnavailable
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import Pipeline, metric_points, pipeline

# ------------------------------------------------- 1. decided by the state's absence


class _Away(MemoryStore):
    """Every admission fails, as a Redis store's does while Redis is away."""

    def __init__(self) -> None:
        super().__init__()
        self.admit_now = None  # type: ignore[assignment]  # a shared store: awaited

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        raise StateUnavailable("redis is unreachable", why="unreachable")


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def _closed_app(otel: Pipeline, breaker: bool) -> Starlette:
    policy = Policy.from_dict(
        {
            "state": {"on_error": "closed"},
            "rate_limit": [{"name": "per-client", "rate": "5/s"}],
            **({} if breaker else {"breaker": False}),
        }
    )
    app = Starlette(routes=[Route("/ok", _ok)])
    app.add_middleware(
        FidelityMiddleware, policy=policy, store=_Away(), clock=FakeClock(), observer=otel.telemetry
    )
    return app


async def _get(app: Any, path: str = "/ok") -> httpx.Response:
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get(path)


@pytest.mark.anyio
@pytest.mark.parametrize("breaker", [True, False])
async def test_a_closed_refusal_for_want_of_state_says_state_decided(breaker: bool) -> None:
    otel = pipeline()
    try:
        response = await _get(_closed_app(otel, breaker))
        assert response.status_code == 503
        assert response.json()["type"] == "urn:fidelity-mw:problem:state-unavailable"
        assert response.headers["x-fidelity-decided-by"] == "state"
        [span] = otel.finished()
        attrs = dict(span.attributes or {})
        assert attrs[schema.DECIDED_BY] == "state"
        assert attrs[schema.OUTCOME] == "shed"
        # the record: the layer whose state failed, why, and on what
        layer = "breaker" if breaker else "ratelimit:per-client"
        assert f"{layer}/reject/state_error:StateUnavailable@fallback" in str(
            attrs[schema.DECISIONS]
        )
        requests = {
            a[schema.DECIDED_BY]: p.value
            for a, p in metric_points(otel.metrics, "fidelity.requests")
        }
        assert requests == {"state": 1}
    finally:
        otel.shutdown()


@pytest.mark.anyio
async def test_a_limit_dependency_refused_for_want_of_state_says_state_decided() -> None:
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("5/min"))])
    async def x() -> dict[str, int]:
        return {"ok": 1}

    otel = pipeline()
    policy = Policy(breaker=None, state=StateConfig(on_error="closed"))
    app.add_middleware(
        FidelityMiddleware, policy=policy, store=_Away(), clock=FakeClock(), observer=otel.telemetry
    )
    fidelity.install(app)
    try:
        response = await _get(app, "/x")
        assert response.status_code == 503
        assert response.headers["x-fidelity-decided-by"] == "state"
        [span] = otel.finished()
        attrs = dict(span.attributes or {})
        assert (attrs[schema.DECIDED_BY], attrs[schema.OUTCOME]) == ("state", "shed")
        assert "ratelimit:" in str(attrs[schema.DECISIONS])  # whose state it was
    finally:
        otel.shutdown()


def test_an_upstream_breaker_refusal_for_want_of_state_says_state_decided() -> None:
    from fidelity_mw.inbound.refusals import control_refusal

    ctx = DecisionContext(engine=Engine(), route="/x", method="GET", started_at=0.0)
    unread = CircuitOpen("no state", host="api", retry_after_s=1.0)
    unread.__cause__ = StateUnavailable("redis is unreachable", why="unreachable")
    refusal = control_refusal(ctx, unread, 0.0)
    assert refusal is not None
    assert refusal[0] == 503
    assert ctx.decided_by == "state"
    # an open breaker is still the breaker's
    ctx = DecisionContext(engine=Engine(), route="/x", method="GET", started_at=0.0)
    assert control_refusal(ctx, CircuitOpen("open", host="api", retry_after_s=1.0), 0.0) is not None
    assert ctx.decided_by == "breaker"


# ------------------------------------- 2. the breaker gauge on state it cannot read


def _gauge(reader: Any) -> dict[tuple[str, str, str | None], int]:
    return {
        (a[schema.SUBJECT], a[schema.BREAKER_STATE], a.get(schema.BREAKER_SCOPE)): p.value
        for a, p in metric_points(reader, "fidelity.breaker.state")
    }


def test_the_gauge_lists_an_upstream_breaker_closed_from_its_first_call() -> None:
    p = pipeline()
    policy = Policy.from_dict(
        {"upstream": [{"host": "plain.internal", "breaker": False}, {"host": "*"}]}
    )
    engine = Engine(policy)
    engine.store = object()  # type: ignore[assignment]  # a store it cannot read (Redis)

    def call(subject: str) -> None:
        ctx = DecisionContext(engine=engine, route="/x", method="GET", started_at=0.0)
        ctx.add(Decision("retry", subject, "allow", "attempt", "redis", 0.001, 1.0))
        p.telemetry.call_end(ctx)

    try:
        call("api:443")
        call("plain.internal:443")  # no breaker: not on the gauge
        call("api.example")
        gauge = _gauge(p.metrics)
        assert {k for k, v in gauge.items() if v == 1} == {
            ("api:443", "closed", "upstream"),
            ("api.example", "closed", "upstream"),
        }
        assert gauge[("api:443", "open", "upstream")] == 0
        assert not [k for k in gauge if k[0].startswith("plain")]
    finally:
        p.shutdown()


@pytest.mark.anyio
@pytest.mark.redis
async def test_on_redis_the_gauge_lists_a_breaker_never_open_as_memory_does(
    redis_url: str,
) -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    listed = []
    for url in (None, redis_url):
        policy = Policy.from_dict(
            {
                **({"state": {"url": url}} if url else {}),
                "upstream": [{"host": "nobreaker", "breaker": False}, {"host": "api"}],
            }
        )
        engine = Engine(policy, clock=FakeClock())
        p = pipeline()
        transport = FidelityTransport(
            httpx.MockTransport(upstream), engine=engine, observer=p.telemetry
        )
        try:
            async with httpx.AsyncClient(transport=transport) as client:
                assert (await client.get("http://api/x")).status_code == 200
                assert (await client.get("http://nobreaker/x")).status_code == 200
            listed.append({k for k, v in _gauge(p.metrics).items() if v == 1})
        finally:
            await engine.aclose()
            p.shutdown()
    memory, redis = listed
    assert memory == {("api", "closed", "upstream")}
    assert redis == memory


# ------------------------------------------------------ 3. the policy at startup


def test_building_the_middleware_logs_the_policy_in_force_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = Policy.from_dict(
        {
            "state": {
                "url": "rediss://app:s3cret@redis.internal:6379/0?ssl_password=k3y",
                "on_error": "closed",
            },
            "rate_limit": [{"name": "a", "rate": "5/s"}, {"name": "b", "rate": "50/min"}],
            "route": [{"match": "/x", "breaker": {"consecutive_failures": 3}}, {"match": "/y"}],
            "upstream": [{"host": "api", "breaker": False}, {"host": "db"}],
        }
    )
    with caplog.at_level(logging.INFO, logger="fidelity_mw"):
        for _ in range(2):  # a stack built again (Starlette does) says nothing new
            FidelityMiddleware(_ok, policy=policy, store=MemoryStore(), telemetry=False)
    said = [r for r in caplog.records if "in force" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == logging.INFO
    assert said[0].name == "fidelity_mw"
    line = said[0].getMessage()
    assert policy.version in line
    assert "rediss://app:***@redis.internal:6379/0?ssl_password=***" in line
    assert "s3cret" not in line
    assert "k3y" not in line
    assert "on_error=closed" in line
    assert "2 rate limits, 2 routes, 3 breaker tables" in line


# ------------------------------------- 4. a route opting out of [concurrency]


def _route_concurrency(value: object) -> Policy:
    return Policy.from_dict(
        {
            "breaker": False,
            "concurrency": {"limit": 1},
            "route": [{"match": "/w", "concurrency": value}],
        }
    )


@pytest.mark.anyio
async def test_a_route_with_concurrency_false_has_no_bulkhead() -> None:
    from test_bulkhead import Service

    policy = _route_concurrency(False)
    assert policy.routes[0].concurrency is False
    assert Policy.from_dict(policy.to_dict()) == policy  # round trip
    svc = Service(policy, FakeClock())
    held = [asyncio.create_task(svc.client.get("/w?hold=1")) for _ in range(3)]
    await svc.in_flight(3)  # the policy's limit of 1 does not apply here
    svc.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
    assert not [d for c in svc.contexts for d in c.decisions if d.layer == "concurrency"]
    assert "/w" not in svc.mw.engine.bulkheads
    await svc.client.aclose()


def test_a_route_with_concurrency_true_takes_the_policys() -> None:
    assert _route_concurrency(True) == _route_concurrency(None)  # true: as left out
    assert _route_concurrency(True).routes[0].concurrency is None


@pytest.mark.parametrize("value", ["off", 0, [1]])
def test_a_wrong_route_concurrency_says_what_it_may_be(value: object) -> None:
    with pytest.raises(PolicyError) as err:
        _route_concurrency(value)
    [issue] = err.value.issues
    assert issue.path == "route[0].concurrency"
    assert "true (the policy's [concurrency])" in issue.message
    assert "false (no bulkhead on this route)" in issue.message


class _NoBreakerState(MemoryStore):
    """The upstream breaker's state cannot be read (Redis away)."""

    def outbound_begin_now(self, *args: Any, **kw: Any) -> Any:
        raise StateUnavailable("redis is unreachable", why="unreachable")

    outbound_gate_now = outbound_begin_now


@pytest.mark.anyio
async def test_an_upstream_refused_for_want_of_state_is_not_recorded_or_gauged_open() -> None:
    """The app catches the refusal and answers its own 503: decided by the state's
    absence; the record says `state_error`, not `breaker_open`, so the breaker gauge on
    state it cannot read does not show the breaker open."""
    from fidelity_mw.errors import CircuitOpen as Refused

    seen: list[DecisionContext] = []

    async def calls(request: Request) -> Response:
        import fidelity_mw

        seen.append(fidelity_mw.current())
        transport = FidelityTransport(httpx.MockTransport(lambda r: httpx.Response(200)))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://pay") as c:
                await c.get("/")
        except Refused:
            return PlainTextResponse("later", status_code=503)
        return PlainTextResponse("never")

    otel = pipeline()
    app = Starlette(routes=[Route("/x", calls)])
    policy = Policy(state=StateConfig(on_error="closed"), breaker=None)
    app.add_middleware(
        FidelityMiddleware, policy=policy, store=_NoBreakerState(), clock=FakeClock(),
        observer=otel.telemetry,
    )  # fmt: skip
    try:
        response = await _get(app, "/x")
        assert response.status_code == 503
        [span] = otel.finished()
        attrs = dict(span.attributes or {})
        assert (attrs[schema.DECIDED_BY], attrs[schema.OUTCOME]) == ("state", "shed")
        assert "breaker/reject/state_error:StateUnavailable@fallback" in str(
            attrs[schema.DECISIONS]
        )
        assert response.headers.get("x-fidelity-retry") == "exhausted"  # as before
        # the gauge on state it cannot read (Redis) reports what decisions revealed
        p = pipeline()
        shared = DecisionContext(engine=Engine(), route="/x", method="GET", started_at=0.0)
        shared.engine.store = object()  # type: ignore[assignment]
        for d in seen[0].decisions:
            shared.add(d)
        p.telemetry.call_end(shared)
        assert not [k for k, v in _gauge(p.metrics).items() if v == 1 and k[1] == "open"]
        p.shutdown()
    finally:
        otel.shutdown()
