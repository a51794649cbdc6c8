"""Defects a tenth review (inbound) found.

1. An app that called `response.raise_for_status()` on the answer FidelityTransport gave
   up on (it retried a 503 until its attempts or its retry budget ran out) let the
   `httpx.HTTPStatusError` out: the server answered a bare 500, without the
   `x-fidelity-retry: exhausted` marker, so a caller retried a request we had already
   retried, and a budget refusal surfaced as a 500. It is now answered as the same
   give-up with a transport error is: 502 `upstream-failed` marked exhausted, or 503
   `retry-budget-exhausted` naming the budget. An HTTPStatusError the transport did
   not give up on (a 500 it does not retry, a 404) stays the app's 500.
2. `methods = ["GET"]` on a `[[rate_limit]]` or `[[route]]` skipped HEAD, which Starlette
   serves with the GET handler: the limit could be bypassed with HEAD, and HEAD got
   another breaker and deadline. GET now covers HEAD unless an entry of the same list
   names HEAD itself (RFC 9110: HEAD is GET without the body); `map` shows `GET,HEAD`.
3. A request a Starlette `Host` route served was `!unmatched`: each host's whole API
   shared one breaker, and endpoint overrides under it were not found. It is named by
   the route of the host's app that serves it.
4. A limit name with "|" made the admin page split the state key "<name>|<client>" at
   the wrong bar (the wrong limit, a key hash no trace carries): now a policy error.
5. `Depends(fidelity.limit(..., key="header:..."))` (or a key function or dependency)
   left `ctx.client_key` unset; and its 429 carried the middleware's own limits' fields
   as charged (r one low), though those units are given back.
6. Starlette's trailing-slash redirect (307) was charged, and the request it led to
   again. With `charge = "served"` its units now come back; `"always"` charges it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy, RateLimit
from fidelity_mw.context import context_from_scope
from fidelity_mw.policy import (
    BreakerConfig,
    DeadlineConfig,
    RetryConfig,
    RouteConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


# ------------------------------------------- 1. raise_for_status() after a give-up


def _raising_app(
    upstream_status: int, retry: RetryConfig, seen: list[Any]
) -> tuple[Starlette, list[str]]:
    sent: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(upstream_status, text="upstream says no")

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def charge(request: Request) -> Response:
        seen.append(request.scope)
        response = await outbound.get("http://payments.internal" + request.url.path)
        response.raise_for_status()  # the common handler: no try/except around it
        return PlainTextResponse("charged")

    app = Starlette(routes=[Route("/{kind}", charge)])
    policy = Policy(
        deadline=DeadlineConfig(default_ms=5000),
        breaker=BreakerConfig(consecutive_failures=100),
        upstreams=(UpstreamConfig(host="*", retry=retry),),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app, sent


def _doc(response: httpx.Response) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(response.content)
    return doc


async def test_raise_for_status_after_retries_ran_out_is_a_502_marked_exhausted() -> None:
    """Before: a bare 500 (text/plain "Internal Server Error"), no marker."""
    seen: list[Any] = []
    app, sent = _raising_app(503, RetryConfig(attempts=3, base_ms=1, max_ms=1), seen)
    async with _client(app) as client:
        got = await client.get("/a")
    assert sent == ["/a"] * 3  # retried, then given up
    assert got.status_code == 502
    assert got.headers["x-fidelity-retry"] == "exhausted"
    assert "x-fidelity-decided-by" not in got.headers  # the upstream failed, not a layer
    assert got.headers["content-type"] == "application/problem+json"
    doc = _doc(got)
    assert doc["type"].endswith("upstream-failed")
    assert doc["upstream"] == "payments.internal"
    assert "503" in doc["detail"]
    ctx = context_from_scope(seen[0])
    assert ctx is not None
    assert (ctx.decided_by, ctx.outcome, ctx.status) == ("app", "failed", 502)


async def test_raise_for_status_after_the_budget_refused_a_retry_is_a_503_of_the_budget() -> None:
    seen: list[Any] = []
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=1, budget_ratio=0.0, budget_min_per_s=0.0)
    app, sent = _raising_app(503, retry, seen)
    async with _client(app) as client:
        got = await client.get("/b")
    assert sent == ["/b"]  # the retry was refused by the budget
    assert got.status_code == 503
    assert got.headers["x-fidelity-retry"] == "exhausted"
    assert got.headers["x-fidelity-decided-by"] == "budget"
    doc = _doc(got)
    assert doc["type"].endswith("retry-budget-exhausted")
    assert (doc["layer"], doc["upstream"]) == ("budget", "payments.internal")
    ctx = context_from_scope(seen[0])
    assert ctx is not None
    assert (ctx.decided_by, ctx.outcome) == ("budget", "shed")
    assert [d.layer for d in ctx.decisions if d.verdict == "give_up"] == ["budget"]


@pytest.mark.parametrize(("status", "attempts"), [(500, 3), (404, 3), (503, 1)])
async def test_an_http_status_error_not_given_up_on_stays_the_apps_500(
    status: int, attempts: int
) -> None:
    """A 500 and a 404 are not retried; with retries off we did not retry either: the
    caller is the nearest owner that may, as for a transport error."""
    seen: list[Any] = []
    app, sent = _raising_app(status, RetryConfig(attempts=attempts, base_ms=1, max_ms=1), seen)
    async with _client(app) as client:
        got = await client.get("/c")
    assert sent == ["/c"]
    assert got.status_code == 500
    assert "x-fidelity-retry" not in got.headers
    assert got.text == "Internal Server Error"


async def test_a_later_unretried_error_of_the_same_upstream_stays_the_apps_500() -> None:
    """The give-up of an earlier call in the request marks that call's response only."""
    calls: list[int] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503 if request.url.path == "/first" else 404)

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def handler(request: Request) -> Response:
        first = await outbound.get("http://payments.internal/first")
        assert first.status_code == 503  # given up on, handled by the app
        second = await outbound.get("http://payments.internal/second")
        second.raise_for_status()
        return PlainTextResponse("unreachable")

    app = Starlette(routes=[Route("/", handler)])
    retry = RetryConfig(attempts=2, base_ms=1, max_ms=1)
    policy = Policy(upstreams=(UpstreamConfig(host="*", retry=retry),))
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    async with _client(app) as client:
        got = await client.get("/")
    assert len(calls) == 3
    assert got.status_code == 500


# ------------------------------------------- 2. HEAD is GET without the body


def _head_app(policy: Policy) -> Starlette:
    async def items(request: Request) -> Response:
        return PlainTextResponse("items")

    app = Starlette(routes=[Route("/items", items)])  # GET, so HEAD too (Starlette)
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_a_get_only_limit_counts_head_too() -> None:
    """Before: HEAD (served by the GET handler) was never counted: 200 for ever."""
    limit = RateLimit(name="reads", rate="2/h", methods=("GET",))
    app = _head_app(Policy(rate_limits=(limit,), breaker=None))
    async with _client(app) as client:
        codes = [(await client.head("/items")).status_code for _ in range(2)]
        codes.append((await client.get("/items")).status_code)
        codes.append((await client.post("/items")).status_code)  # 405, not counted
    assert codes == [200, 200, 429, 405]


async def test_head_named_by_another_limit_is_that_limits_alone() -> None:
    limits = (
        RateLimit(name="reads", rate="1/h", methods=("GET",)),
        RateLimit(name="probes", rate="3/h", methods=("HEAD",)),
    )
    app = _head_app(Policy(rate_limits=limits, breaker=None))
    async with _client(app) as client:
        heads = [(await client.head("/items")) for _ in range(4)]
    assert [r.status_code for r in heads] == [200, 200, 200, 429]
    assert heads[0].headers["ratelimit"] == '"probes";r=2;t=1200'


async def test_a_get_only_route_entry_covers_head() -> None:
    """Before: HEAD fell through to the policy's defaults: another breaker (the route's
    name) and another deadline."""
    policy = Policy(
        routes=(RouteConfig(match="/items", methods=("GET",), name="reads", deadline_ms=100),),
    )
    engine = FidelityMiddleware(_head_app(policy), policy=policy, telemetry=False).engine
    for method in ("GET", "HEAD"):
        plan = engine.plan_for({"type": "http", "method": method, "path": "/items"})
        assert (plan.route, plan.deadline_default_s) == ("reads", 0.1)
    post = engine.plan_for({"type": "http", "method": "POST", "path": "/items"})
    assert post.route != "reads"
    named = Policy(
        routes=(
            RouteConfig(match="/items", methods=("GET",), name="reads"),
            RouteConfig(match="/items", methods=("HEAD",), name="probes"),
        ),
    )
    engine = FidelityMiddleware(_head_app(named), policy=named, telemetry=False).engine
    assert engine.plan_for({"type": "http", "method": "HEAD", "path": "/items"}).route == "probes"


def test_map_shows_the_head_that_get_implies() -> None:
    from fidelity_mw.tools.statemap import layers_for

    def subjects(policy: Policy) -> list[str]:
        return [f"{row.subject} {row.data}" for row in layers_for(policy)]

    get_only = Policy(
        rate_limits=(RateLimit(name="reads", match="/api/*", methods=("GET",)),),
        routes=(RouteConfig(match="/api/slow", methods=("GET",), deadline_ms=100),),
    )
    shown = subjects(get_only)
    assert any("limit 'reads' on /api/* GET,HEAD," in s for s in shown)
    assert any("100 ms for GET,HEAD requests matching /api/slow" in s for s in shown)
    named = Policy(
        rate_limits=(
            RateLimit(name="reads", methods=("GET",)),
            RateLimit(name="probes", methods=("HEAD",)),
        ),
    )
    shown = subjects(named)
    assert any("limit 'reads' on * GET," in s for s in shown)
    assert any("limit 'probes' on * HEAD," in s for s in shown)


# ------------------------------------------- 3. routes under a Host are named


def _hosted_app() -> Starlette:
    from starlette.routing import Host, Router

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def broken(request: Request) -> Response:
        return PlainTextResponse("down", status_code=500)

    @fidelity.deadline(250)
    async def quick(request: Request) -> Response:
        return PlainTextResponse("quick")

    api = Router(
        routes=[Route("/items/{id}", ok), Route("/broken", broken), Route("/quick", quick)]
    )
    app = Starlette(
        routes=[Host("api.example.com", app=api), Host("{tenant}.example.com", app=api)]
    )
    policy = Policy(breaker=BreakerConfig(consecutive_failures=1, open_s=60.0))
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_a_route_under_a_host_is_named_by_its_own_template() -> None:
    """Before: every request to a Host's app was `!unmatched`, one breaker for the whole
    API: one failing endpoint shed every other with 503."""
    seen: list[str] = []
    app = _hosted_app()

    async def watch(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send)
        if scope["type"] == "http":
            ctx = context_from_scope(scope)
            assert ctx is not None
            seen.append(ctx.route)

    async with _client(watch) as client:
        broken = await client.get("/broken", headers={"host": "api.example.com"})
        assert broken.status_code == 500  # opens the breaker of /broken only
        item = await client.get("/items/7", headers={"host": "api.example.com:8000"})
        tenant = await client.get("/items/8", headers={"host": "acme.example.com"})
        again = await client.get("/broken", headers={"host": "api.example.com"})
    assert (item.status_code, tenant.status_code, again.status_code) == (200, 200, 503)
    # (since review 12 the name carries the host pattern: one template, two hosts, two
    # breakers)
    assert seen == [
        "api.example.com/broken",
        "api.example.com/items/{id}",
        "{tenant}.example.com/items/{id}",
        "api.example.com/broken",
    ]


def test_an_endpoint_override_under_a_host_is_found() -> None:
    app = _hosted_app()
    engine = FidelityMiddleware(app, policy=Policy(), telemetry=False).engine
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/quick",
        "headers": [(b"host", b"api.example.com")],
    }
    plan = engine.plan_for(scope)
    assert (plan.route, plan.deadline_default_s) == ("api.example.com/quick", 0.25)
    # no host serves it (a fresh engine, so no plan learned above is in the way)
    engine = FidelityMiddleware(app, policy=Policy(), telemetry=False).engine
    other = dict(scope, headers=[(b"host", b"elsewhere.org")])
    assert engine.plan_for(other).route == "!unmatched"


# ------------------------------------------- 4. a limit name with "|"


def test_a_limit_name_with_a_bar_is_an_error_naming_it() -> None:
    """The state key is "<name>|<client key>": the admin page split "a|b|1.2.3.4" into
    limit "a" and client "b|1.2.3.4" (the wrong row, a key hash no trace carries)."""
    from fidelity_mw import PolicyError

    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"rate_limit": [{"name": "reads|writes", "rate": "5/s"}]})
    [issue] = caught.value.issues
    assert issue.path == "rate_limit[0].name"
    assert "|" in issue.message
    assert Policy.from_dict({"rate_limit": [{"name": "reads-writes"}]}).rate_limits


def test_a_depends_limit_name_with_a_bar_is_an_error() -> None:
    from fidelity_mw import PolicyError
    from fidelity_mw.fastapi import Fidelity

    with pytest.raises(PolicyError, match="name"):
        Fidelity().limit("5/s", name="a|b")


async def test_the_admin_page_splits_each_limit_from_its_client_key() -> None:
    """A client key may carry a bar (an API key header): the name is the part before
    the first one, now that names cannot hold one."""
    from fidelity_mw.admin.app import AdminApp

    limit = RateLimit(name="per-key", rate="5/h", key="header:X-Api-Key")
    app = _head_app(Policy(rate_limits=(limit,), breaker=None))
    async with _client(app) as client:
        assert (await client.get("/items", headers={"x-api-key": "k|1"})).status_code == 200
    mw: Any = app.middleware_stack
    while not isinstance(mw, FidelityMiddleware):
        mw = mw.app
    admin = AdminApp(mw.engine, token="t" * 32)
    [row] = (await admin.state(mw.engine))["limiter_keys"]
    assert row["limit"] == "per-key"
    assert row["key_hash"] == admin._hashers[mw.engine]("h:k|1")  # as traces hash it


# ------------------------------------------- 5. Depends(limit): client key, fields on its 429


def _depends_app(key: str, seen: list[Any]) -> Any:
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()
    app = FastAPI()
    fidelity.install(app)

    @app.get("/export", dependencies=[Depends(fidelity.limit("1/h", key=key, name="export"))])
    async def export(request: Request) -> dict[str, bool]:
        seen.append(request.state.fidelity)
        return {"ok": True}

    outer = RateLimit(name="per-client", rate="10/h")
    policy = Policy(rate_limits=(outer,), breaker=None)
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_a_depends_limit_keyed_by_a_header_sets_the_client_key() -> None:
    """Before: None, so the request's traces carried no `fidelity.client.key_hash` and
    the admin page's row of the key could not be matched to them."""
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()
    app = FastAPI()
    seen: list[Any] = []
    limit = fidelity.limit("5/h", key="header:X-Api-Key", name="per-key")

    @app.get("/data", dependencies=[Depends(limit)])
    async def data(request: Request) -> dict[str, bool]:
        seen.append(request.state.fidelity)
        return {"ok": True}

    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=FakeClock(), telemetry=False)
    async with _client(app) as client:
        assert (await client.get("/data", headers={"x-api-key": "abc"})).status_code == 200
        assert (await client.get("/data")).status_code == 200  # falls back to the address
    assert [ctx.client_key for ctx in seen] == ["h:abc", "127.0.0.1"]


async def test_a_depends_429_shows_the_middleware_limit_as_it_stands_after_the_refund() -> None:
    """The Depends limit's 429 gives the middleware's unit back (one layer's rejection
    costs no quota of another): its field said r one low, as if it had been spent."""
    seen: list[Any] = []
    app = _depends_app("client_ip", seen)
    async with _client(app) as client:
        first = await client.get("/export")
        refused = [await client.get("/export") for _ in range(2)]
    assert first.status_code == 200
    assert '"per-client";r=9;' in first.headers["ratelimit"]
    for response in refused:
        assert response.status_code == 429
        fields = response.headers.get_list("ratelimit")
        assert any(f.startswith('"export";r=0;') for f in fields)
        [outer] = [f for f in fields if f.startswith('"per-client"')]
        assert outer.startswith('"per-client";r=9;'), fields  # before: r=8


async def test_a_depends_429_x_ratelimit_fields_are_one_limits_three() -> None:
    """Each `X-RateLimit-*` field once: of the Depends limit's three and the
    middleware's, the one closer to refusing (`tests/test_defects_review48_hdr_fields.py`).
    Before review 48 both went out, `x-ratelimit-remaining: 0, 9` read as one value.
    (The middleware's own fields on such a 429 count the refund: the IETF test above.)"""
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()
    app = FastAPI()
    fidelity.install(app)

    @app.get("/export", dependencies=[Depends(fidelity.limit("1/h", name="export"))])
    async def export() -> dict[str, bool]:
        return {"ok": True}

    policy = Policy(
        rate_limits=(RateLimit(name="per-client", rate="10/h"),),
        breaker=None,
        rate_limit_header_names="x-ratelimit",
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    async with _client(app) as client:
        first = await client.get("/export")
        refused = await client.get("/export")
    for response in (first, refused):
        assert response.headers.get_list("x-ratelimit-remaining") == ["0"]
        assert response.headers.get_list("x-ratelimit-limit") == ["1"]  # the Depends limit's
        assert len(response.headers.get_list("x-ratelimit-reset")) == 1
    assert refused.status_code == 429


# ------------------------------------------- 6. the router's trailing-slash redirect


def _slash_app(charge: str) -> Starlette:
    async def items(request: Request) -> Response:
        return PlainTextResponse("items")

    app = Starlette(routes=[Route("/api/items", items)])  # redirect_slashes: on
    limit = RateLimit(name="per-client", rate="2/h", match="/api/*", charge=charge)
    policy = Policy(rate_limits=(limit,), breaker=None)
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_the_routers_slash_redirect_costs_no_quota_when_charged_served() -> None:
    """Before: the 307 to /api/items was charged, and the request it led to again: a
    client that followed it paid twice, and was refused at half its rate."""
    async with _client(_slash_app("served")) as client:
        codes = []
        for _ in range(2):
            redirect = await client.get("/api/items/")
            assert redirect.status_code == 307
            assert redirect.headers["location"] == "http://t/api/items"
            codes.append((await client.get("/api/items")).status_code)
        codes.append((await client.get("/api/items")).status_code)
        # (a redirect is admitted first: with the bucket empty, it is refused too)
        codes.append((await client.get("/api/items/")).status_code)
    assert codes == [200, 200, 429, 429]


async def test_the_routers_slash_redirect_is_charged_when_charge_always() -> None:
    async with _client(_slash_app("always")) as client:
        assert (await client.get("/api/items/")).status_code == 307
        assert (await client.get("/api/items")).status_code == 200
        assert (await client.get("/api/items/")).status_code == 429


async def test_a_path_the_router_does_not_redirect_is_charged_as_before() -> None:
    async with _client(_slash_app("served")) as client:
        codes = [(await client.get("/api/other/")).status_code for _ in range(3)]
    assert codes == [404, 404, 429]
