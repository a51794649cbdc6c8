"""Review 12: route naming in telemetry, a mount's own redirects, refusal bodies; each test
failed before its fix.

1. `http.route` (and our span's name) was the route's *name*: a `[[route]]` name or glob,
   or under a `Host` `api.example.com/items/{id}`. OpenTelemetry's HTTP conventions want
   the framework's path template alone. The plan now keeps the template apart from the
   name (which stays the identity: breakers, counters, `fidelity.route`). A span of an
   instrumentation keeps its own `http.route`, or its lack of one.
2. A `Host` inside a `Mount` was named `/api` + `api.example.com/items/{id}`: the host
   pattern now leads (`api.example.com/api/items/{id}`).
3. A mounted app's or router's own trailing-slash redirect (`/api/items/` to `/api/items`
   under `Mount("/api")`, or `/api` to `/api/` for an app served under `root_path /api`)
   was charged as a served request; the top router's own already was not.
4. The fail-closed 503 said "the control state is unreachable" whatever the reason; it
   now says what `fallback_why` says, in words that name nothing internal, with the same
   problem `type` and `title`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.starlette import StarletteInstrumentor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Host, Mount, Route, Router

from fidelity_mw import FidelityMiddleware, Policy, RateLimit, RouteConfig, routes
from fidelity_mw.errors import StateUnavailable
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.telemetry import Telemetry
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import pipeline
from test_telemetry_otlp import Receiver, attrs, otlp_http_providers

pytestmark = pytest.mark.anyio


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _get(app: Any, path: str, host: str = "t", root_path: str = "") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
        return await client.get(path)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


# ------------------------------------------- 1. http.route is the path template alone


async def test_http_route_is_the_template_not_the_policy_route_name_nor_the_host(
    receiver: Receiver,
) -> None:
    """Before: a `[[route]]` named `checkout` put `http.route = "checkout"` (span `GET
    checkout`), and a `Host` `http.route = "api.example.com/items/{id}"`. Decoded from the
    real OTLP/HTTP export: `http.route` and the span name carry the template alone, and
    `fidelity.route` keeps the name (the identity the breaker and the counters use)."""
    setup = otlp_http_providers(receiver.endpoint, "routes")
    try:
        tel = Telemetry(
            tracer_provider=setup.tracer_provider,
            meter_provider=setup.meter_provider,
            request_attributes="all",  # `fidelity.route` on a plain request too
        )
        app = Starlette(
            routes=[
                Host("api.example.com", app=Router(routes=[Route("/items/{id}", _ok)])),
                Route("/orders/{id}", _ok),
            ]
        )
        policy = Policy(routes=(RouteConfig(match="/orders/*", name="checkout"),))
        app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), observer=tel)
        assert (await _get(app, "/orders/7")).status_code == 200
        assert (await _get(app, "/items/3", host="api.example.com")).status_code == 200
        setup.force_flush()
    finally:
        setup.shutdown()
    spans = sorted(receiver.spans(), key=lambda s: s.start_time_unix_nano)
    seen = [(s.name, attrs(s.attributes)) for s in spans]
    assert [(name, a["http.route"], a["fidelity.route"]) for name, a in seen] == [
        ("GET /orders/{id}", "/orders/{id}", "checkout"),
        ("GET /items/{id}", "/items/{id}", "api.example.com/items/{id}"),
    ]
    # the metrics keep the identity: fidelity.route, never http.route
    route_names = {
        kv.value.string_value
        for request in receiver.metrics
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "fidelity.requests"
        for point in m.sum.data_points
        for kv in point.attributes
        if kv.key == "fidelity.route"
    }
    assert route_names == {"checkout", "api.example.com/items/{id}"}


async def test_a_policy_glob_alone_is_no_http_route() -> None:
    """An app without routes of its own (a bare ASGI app) named by a `[[route]]` glob:
    the glob is our pattern, not the framework's template, so no `http.route` (the
    conventions: none rather than a substitute) and the span is named by the method."""
    pipe = pipeline(request_attributes="all")  # the route on every span

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("ok")(scope, receive, send)

    policy = Policy(routes=(RouteConfig(match="/api/*"),))
    app = FidelityMiddleware(bare, policy=policy, clock=FakeClock(), observer=pipe.telemetry)
    assert (await _get(app, "/api/x")).status_code == 200
    (span,) = pipe.finished()
    assert span.name == "GET"
    assert "http.route" not in (span.attributes or {})
    assert (span.attributes or {})["fidelity.route"] == "/api/*"


async def test_the_plain_asgi_instrumentations_span_is_left_without_http_route() -> None:
    """`OpenTelemetryMiddleware` outside ours sets no `http.route` on its span (Starlette
    routes are opaque to it), nor on its duration metric: ours is not added (the span
    would disagree with its metric, and the SDK's attribute check costs every request);
    `fidelity.route` names the route there."""
    pipe = pipeline(request_attributes="all")  # the route on every span
    app = Starlette(routes=[Mount("/api", routes=[Route("/items/{id}", _ok)])])
    app.add_middleware(FidelityMiddleware, policy=Policy(), observer=pipe.telemetry)
    outer = OpenTelemetryMiddleware(app, tracer_provider=pipe.tracer_provider)
    assert (await _get(outer, "/api/items/1")).status_code == 200
    (server,) = [s for s in pipe.finished() if s.attributes and "fidelity.route" in s.attributes]
    assert server.instrumentation_scope is not None
    assert server.instrumentation_scope.name == "opentelemetry.instrumentation.asgi"
    assert "http.route" not in (server.attributes or {})
    assert (server.attributes or {})["fidelity.route"] == "/api/items/{id}"


async def test_an_instrumentations_own_http_route_is_kept() -> None:
    """The Starlette instrumentation names a mounted route by the mount (`/api`); its span
    name and its duration metric say the same, so ours does not overwrite it."""
    pipe = pipeline(request_attributes="all")  # the route on every span
    app = Starlette(routes=[Mount("/api", routes=[Route("/items/{id}", _ok)])])
    app.add_middleware(FidelityMiddleware, policy=Policy(), observer=pipe.telemetry)
    StarletteInstrumentor.instrument_app(app, tracer_provider=pipe.tracer_provider)
    try:
        assert (await _get(app, "/api/items/1")).status_code == 200
    finally:
        StarletteInstrumentor.uninstrument_app(app)
    (server,) = [s for s in pipe.finished() if s.attributes and "fidelity.route" in s.attributes]
    assert (server.attributes or {})["http.route"] == "/api"
    assert (server.attributes or {})["fidelity.route"] == "/api/items/{id}"


async def test_an_asgi_span_given_its_own_http_route_keeps_it() -> None:
    """The plain ASGI middleware with `default_span_details` of the app's own that sets
    `http.route`: that value stays."""
    pipe = pipeline(request_attributes="all")  # the route on every span
    app = Starlette(routes=[Route("/items/{id}", _ok)])
    app.add_middleware(FidelityMiddleware, policy=Policy(), observer=pipe.telemetry)

    def details(scope: Any) -> tuple[str, dict[str, Any]]:
        return "GET items", {"http.route": "/items/:id"}

    outer = OpenTelemetryMiddleware(
        app, default_span_details=details, tracer_provider=pipe.tracer_provider
    )
    assert (await _get(outer, "/items/1")).status_code == 200
    (server,) = [s for s in pipe.finished() if s.attributes and "fidelity.route" in s.attributes]
    assert (server.attributes or {})["http.route"] == "/items/:id"


def test_the_template_is_cached_with_the_plan() -> None:
    app = Starlette(
        routes=[
            Host("api.example.com", app=Router(routes=[Route("/items/{id}", _ok)])),
            Mount("/raw", app=PlainTextResponse("raw")),
        ]
    )
    engine = FidelityMiddleware(app, policy=Policy(), telemetry=False).engine
    scope = _scope("/items/1", "api.example.com")
    plan = engine.plan_for(scope)
    assert (plan.route, plan.template) == ("api.example.com/items/{id}", "/items/{id}")
    assert engine.plan_for(scope) is plan
    # a mount of an app of its own: named `/raw/*`, routed by Starlette as `/raw/{path:path}`
    plan = engine.plan_for(_scope("/raw/x", "t"))
    assert (plan.route, plan.template) == ("/raw/*", "/raw/{path:path}")
    # a host none of whose routes serves the request: no template at all
    plan = engine.plan_for(_scope("/nothing", "api.example.com"))
    assert (plan.route, plan.template) == ("api.example.com/*", None)


# ------------------------------------------- 2. a Host inside a Mount


def _scope(path: str, host: str, method: str = "GET", root_path: str = "") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": root_path,
        "headers": [(b"host", host.encode())],
    }


def test_a_host_inside_a_mount_is_named_host_first() -> None:
    """Before: `/api` + `api.example.com/items/{id}` = `/apiapi.example.com/items/{id}`."""
    app = Starlette(
        routes=[
            Mount(
                "/api",
                routes=[Host("api.example.com", app=Router(routes=[Route("/items/{id}", _ok)]))],
            )
        ]
    )
    scope = {**_scope("/api/items/1", "api.example.com"), "app": app}
    assert routes.framework_template(scope) == "api.example.com/api/items/{id}"
    found = routes.framework_route(scope)
    assert found is not None
    assert found.template == "/api/items/{id}"
    miss = {**_scope("/api/other", "api.example.com"), "app": app}
    assert routes.framework_template(miss) == "api.example.com/api/*"


def test_a_host_header_in_capitals_is_the_same_host() -> None:
    """Starlette matches the lowercased host (`API.Example.com` is `api.example.com`).
    Before: ours did not, and named the request `!unmatched`: another breaker."""
    app = Starlette(
        routes=[Host("api.example.com", app=Router(routes=[Route("/items/{id}", _ok)]))]
    )
    for host in ("API.Example.com", "api.example.com:8443"):
        scope = {**_scope("/items/1", host), "app": app}
        assert routes.framework_template(scope) == "api.example.com/items/{id}"
    ipv6 = Starlette(routes=[Host("[::1]", app=Router(routes=[Route("/items/{id}", _ok)]))])
    scope = {**_scope("/items/1", "[::1]:8000"), "app": ipv6}
    assert routes.framework_template(scope) == "[::1]/items/{id}"


# ------------------------------------------- 3. a mount's own trailing-slash redirect


def _mounted(kind: str, charge: Literal["served", "always"] = "served") -> Starlette | FastAPI:
    app: Starlette | FastAPI
    if kind == "routes":
        app = Starlette(routes=[Mount("/api", routes=[Route("/", _ok), Route("/items", _ok)])])
    elif kind == "app":
        sub = Starlette(routes=[Route("/", _ok), Route("/items", _ok)])
        app = Starlette(routes=[Mount("/api", app=sub)])
    else:
        api = FastAPI()
        api.get("/")(lambda: "ok")
        api.get("/items")(lambda: "ok")
        app = FastAPI()
        app.mount("/api", api)
    limit = RateLimit(name="per-client", rate="2/h", charge=charge)
    policy = Policy(rate_limits=(limit,), breaker=None)
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


@pytest.mark.parametrize("kind", ["routes", "app", "fastapi"])
async def test_a_mounted_routers_slash_redirect_costs_no_quota(kind: str) -> None:
    """Before: the mounted router's 307 (`/api/items/` to `/api/items`) was charged like a
    served request, as the top router's own (`/api` to `/api/`) was not: the third
    redirect was a 429."""
    app = _mounted(kind)
    codes = []
    for path in ("/api/items/", "/api/items/", "/api/items/", "/api", "/api"):
        response = await _get(app, path)
        codes.append((response.status_code, response.headers.get("location")))
    assert codes == [
        *[(307, "http://t/api/items")] * 3,
        *[(307, "http://t/api/")] * 2,
    ]
    assert [(await _get(app, "/api/items")).status_code for _ in range(3)] == [200, 200, 429]


async def test_a_mounted_routers_slash_redirect_is_charged_when_charge_always() -> None:
    app = _mounted("routes", charge="always")
    codes = [(await _get(app, "/api/items/")).status_code for _ in range(3)]
    assert codes == [307, 307, 429]


async def test_the_redirect_of_an_app_served_under_a_root_path_costs_no_quota() -> None:
    """The app under `root_path = "/api"` asked for `/api` itself: its router redirects to
    `/api/` (its route `/`). Before: charged (the empty rest of the path was taken for no
    path at all)."""
    app = Starlette(routes=[Route("/", _ok), Route("/items", _ok)])
    limit = RateLimit(name="per-client", rate="2/h")
    app.add_middleware(
        FidelityMiddleware, policy=Policy(rate_limits=(limit,), breaker=None), telemetry=False
    )
    responses = [await _get(app, "/api", root_path="/api") for _ in range(3)]
    assert [(r.status_code, r.headers.get("location")) for r in responses] == [
        (307, "http://t/api/")
    ] * 3


def test_what_is_not_a_mounts_redirect_is_not_taken_for_one() -> None:
    no_redirects = Router(routes=[Route("/items", _ok)], redirect_slashes=False)
    app = Starlette(
        routes=[
            Route("/api/items/", _ok, methods=["POST"]),  # a 405 for a GET, not a redirect
            Mount("/api", routes=[Route("/items", _ok)]),
            Mount("/off", app=no_redirects),
            Mount("/raw", app=PlainTextResponse("raw")),
        ]
    )

    def redirects(path: str, method: str = "GET", root_path: str = "") -> bool:
        return routes.slash_redirect({**_scope(path, "t", method, root_path), "app": app})

    assert redirects("/api/items/", "PUT")  # a mount takes it in full before the 405
    assert not redirects("/api/items/", "POST")  # served by the first route
    assert not redirects("/api/items")  # served
    assert not redirects("/off/items/")  # that router does not redirect
    assert not redirects("/raw/x/")  # an app of its own
    assert not redirects("/api/nothing/")  # neither form is routed
    assert redirects("/api/items/")


# ------------------------------------------- 4. the fail-closed 503 says why


class _Failing(MemoryStore):
    """A store that cannot decide, for the reason `why`."""

    def __init__(self, why: str | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.fallback_why = why
        self.admit_now = None  # type: ignore[assignment]  # (the middleware awaits admit)

    async def admit(self, *args: Any, **kw: Any) -> Any:
        raise StateUnavailable("redis-7.internal:6379 timed out", why=self.fallback_why)


@pytest.mark.parametrize(
    ("why", "detail"),
    [
        ("unreachable", "the control state is unreachable and the policy says to fail closed"),
        (
            "read_only",
            "the control state is read-only for now and the policy says to fail closed",
        ),
        (
            "error",
            "the control state failed to answer this request and the policy says to fail closed",
        ),
        (None, "the control state is unavailable and the policy says to fail closed"),
        ("something new", "the control state is unavailable and the policy says to fail closed"),
    ],
)
async def test_the_fail_closed_503_says_why_and_nothing_internal(
    why: str | None, detail: str
) -> None:
    """Before: "the control state is unreachable" for every reason (a read-only replica,
    an error reply of a Redis that is up, a store without a reason)."""
    limit = RateLimit(name="per-client", rate="5/s")
    policy = Policy(rate_limits=(limit,), state=StateConfig(on_error="closed"))
    app = Starlette(routes=[Route("/x", _ok)])
    app.add_middleware(
        FidelityMiddleware, policy=policy, store=_Failing(why), clock=FakeClock(), telemetry=False
    )
    response = await _get(app, "/x")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    # type and title: what a client may rely on, the same whatever the reason
    assert response.json() == {
        "type": "urn:fidelity-mw:problem:state-unavailable",
        "title": "Service Unavailable",
        "status": 503,
        "detail": detail,
    }
    assert "internal" not in response.text
    assert "timed out" not in response.text


async def test_the_fastapi_limits_fail_closed_503_says_why_too() -> None:
    from fastapi import Depends

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity(
        policy=Policy(state=StateConfig(on_error="closed"), breaker=None),
        store=_Failing("read_only"),
    )
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("5/s"))])
    async def x() -> str:
        return "ok"

    fidelity.install(app)
    response = await _get(app, "/x")
    assert response.status_code == 503
    assert response.json()["type"] == "urn:fidelity-mw:problem:state-unavailable"
    assert response.json()["title"] == "Service Unavailable"
    assert response.json()["detail"] == (
        "the control state is read-only for now and the policy says to fail closed"
    )


async def test_an_upstream_breaker_that_could_not_be_read_is_not_said_open() -> None:
    """An outbound call refused because the upstream's breaker state could not be read
    (`on_error = "closed"`), let out by the app: before, "the circuit breaker for upstream
    ... is open". Same type (the layer's), the detail says what happened."""
    from fidelity_mw import FidelityTransport

    class NoBreakerState(MemoryStore):
        def outbound_begin_now(self, *args: Any, **kw: Any) -> Any:
            raise StateUnavailable("10.0.0.7:6379 refused", why="read_only")

        outbound_gate_now = outbound_begin_now

    async def upstream(request: Request) -> Response:
        return PlainTextResponse("up")

    backend = Starlette(routes=[Route("/", upstream)])
    store = NoBreakerState()

    async def calls(request: Request) -> Response:
        transport = FidelityTransport(httpx.ASGITransport(app=backend))
        async with httpx.AsyncClient(transport=transport, base_url="http://pay.example") as c:
            await c.get("/")
        return PlainTextResponse("never")

    app = Starlette(routes=[Route("/x", calls)])
    policy = Policy(state=StateConfig(on_error="closed"), breaker=None)
    app.add_middleware(
        FidelityMiddleware, policy=policy, store=store, clock=FakeClock(), telemetry=False
    )
    response = await _get(app, "/x")
    assert response.status_code == 503
    body = response.json()
    assert body["type"] == "urn:fidelity-mw:problem:upstream-circuit-open"
    assert body["title"] == "Service Unavailable"
    assert body["detail"] == (
        "the circuit breaker state for upstream 'pay.example' is read-only for now "
        "and the policy says to fail closed; retry in 1 s"
    )
    assert "10.0.0.7" not in response.text


async def test_a_route_with_a_cost_function_keeps_its_template() -> None:
    """A request whose limit's cost comes from a function is admitted by a plan of its own
    costs (routeplan.costed_plan); that plan keeps the route's template, so the span is
    named and `http.route` set as for any other request of the route."""
    pipe = pipeline()
    inner = Starlette(routes=[Route("/batch/{id}", _ok)])
    policy = Policy(
        rate_limits=(RateLimit(name="units", rate="100/s", burst=100, cost=lambda r: 3),)
    )
    app = FidelityMiddleware(inner, policy=policy, clock=FakeClock(), observer=pipe.telemetry)
    response = await _get(app, "/batch/7")
    assert response.status_code == 200
    assert "r=97" in response.headers["ratelimit"]
    (span,) = pipe.finished()
    assert span.name == "GET /batch/{id}"
    assert (span.attributes or {})["http.route"] == "/batch/{id}"
    plan = app.engine.plan_for(
        {"type": "http", "method": "GET", "path": "/batch/7", "headers": [], "root_path": ""}
    )
    assert all(sub.template == "/batch/{id}" for sub in plan.costed.values())
    assert plan.costed, "the costed plan was not cached on the route's plan"
