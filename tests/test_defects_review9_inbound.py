"""Defects a ninth review (inbound, policy, telemetry) found.

1. `priority_header` took any non-empty string: `"x priority"` or `"x-priority:"` is a
   header no request carries, so the bulkhead's priority classes silently never came
   from it. Header names (that one, `[deadline] header`, `key = "header:NAME"`) also
   passed with a final newline ("$" matches before one). Now each names the field.
2. A `key = "header:NAME"` limit keyed a repeated header on all its lines joined: a
   client with a valid API key that sent it and then a new junk line each time got a
   fresh counter per request, while the app (Starlette's `headers[...]`, FastAPI's
   `Header()`) read the valid key from the first line. The key is now the first line,
   in the middleware and in `Depends(fidelity.limit(...))`.
3. Every route under a Starlette `Mount` (a mounted router or sub-app) was one route,
   `/api/*`, with one breaker: one failing endpoint shed every other under the mount
   with 503. Once FastAPI was imported, its route list (which wraps a Mount too) made
   that route "/api". A request under a mount is now named by the mounted route's
   template, prefixed by the mount's (`/api/items/{id}`), and an endpoint's override
   (`@fidelity.deadline`, `@fidelity.breaker`) under a mount is found too.
4. With the ASGI/FastAPI instrumentation outside the middleware, its span (annotated
   as the last body message goes out) said decided_by=app for an error answer a layer
   inside the app caused (`Depends(limit)`'s 429, a 503 after an outbound breaker
   refused), where our own span and the metrics named that layer.
5. A request counted by an API key (`header:NAME`, or a custom key) carried no
   `fidelity.client.key_hash`, and with the providers given to the middleware
   (`tracer_provider=`) the admin page hashed keys with a salt of its own: its rows
   could not be matched to traces as docs/admin.md says.
6. An exception after the response went out whole (a Starlette background task, run
   after the last body message inside the app call) counted as the route's failure:
   a failing e-mail task opened the breaker of a route that answered every request.
7. A table with a problem stopped the policy (or the `[[route]]` / `[[upstream]]`
   holding it) from being built, and with it the checks of its plain values: one
   `fidelity-mw check` run did not name every problem (`trusted_proxies = ["nope"]`
   beside a bad `[[rate_limit]]`). Those values are now checked as given.
8. An `on_reject` response that failed before it started was replaced by the default
   answer, but the request kept the hook's status (the span said 418, the client got 429).
"""

from __future__ import annotations

import sys

import httpx
import pytest

from fidelity_mw import FidelityMiddleware, Policy, PolicyError, RateLimit
from fidelity_mw.policy import BreakerConfig, DeadlineConfig
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


def _problems(**kwargs: object) -> dict[str, str]:
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(kwargs)
    return {issue.path: issue.message for issue in caught.value.issues}


# ------------------------------------------- 1. header names that no request carries


@pytest.mark.parametrize("name", ["x priority", "x-priority:", "x-priority\n"])
def test_a_priority_header_that_is_no_header_name_is_an_error_naming_it(name: str) -> None:
    problems = _problems(priority_header=name)
    assert set(problems) == {"priority_header"}
    assert "is not a valid header name" in problems["priority_header"]
    assert Policy(priority_header="X-Priority").priority_header == "X-Priority"


def test_header_names_with_a_final_newline_are_errors() -> None:
    problems = _problems(
        deadline={"header": ["x-request-timeout-ms\n"]},
        rate_limit=[{"name": "k", "key": "header:X-Api-Key\n"}],
    )
    assert set(problems) == {"deadline.header", "rate_limit[0].key"}
    assert DeadlineConfig(header=("x-request-timeout-ms",)).header == ("x-request-timeout-ms",)


# ------------------------------------------- 2. a repeated key header


def _keyed_app() -> object:
    from fastapi import FastAPI, Header, HTTPException

    app = FastAPI()

    @app.get("/data")
    async def data(x_api_key: str = Header()) -> dict[str, bool]:
        if x_api_key != "valid-key":  # the app authenticates the key it reads
            raise HTTPException(401)
        return {"ok": True}

    limit = RateLimit(name="per-key", rate="2/h", key="header:X-Api-Key")
    policy = Policy(rate_limits=(limit,), breaker=None)
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_a_junk_line_after_a_valid_api_key_is_no_fresh_counter() -> None:
    """Before: 200 five times, each request a counter of its own ("valid-key,0", ...)."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=_keyed_app()), base_url="http://t"
    ) as client:
        codes = [
            (
                await client.get(
                    "/data", headers=[("x-api-key", "valid-key"), ("x-api-key", f"{i}")]
                )
            ).status_code
            for i in range(4)
        ]
        plain = await client.get("/data", headers={"x-api-key": "valid-key"})
    assert codes == [200, 200, 429, 429]
    assert plain.status_code == 429  # the same key's counter
    assert plain.headers["ratelimit"] == '"per-key";r=0;t=1800'


async def test_a_single_key_line_with_a_comma_is_that_whole_line() -> None:
    """Only a repeated header is cut to its first line: a value of one line is kept."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=_keyed_app()), base_url="http://t"
    ) as client:
        junk = [
            (await client.get("/data", headers={"x-api-key": "a,b"})).status_code for _ in range(3)
        ]
        valid = await client.get("/data", headers={"x-api-key": "valid-key"})
    assert junk == [401, 401, 429]
    assert valid.status_code == 200  # "a,b" spent its own counter, not valid-key's


# ------------------------------------------- 3. routes under a Mount


def _mounted_app() -> object:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def good(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def bad(request: object) -> PlainTextResponse:
        return PlainTextResponse("down", status_code=500)

    api = Starlette(routes=[Route("/good/{item}", good), Route("/bad", bad)])
    app = Starlette(routes=[Mount("/api", app=api), Mount("/v2", routes=[Route("/bad", bad)])])
    policy = Policy(breaker=BreakerConfig(min_calls=3, failure_ratio=0.5))
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


@pytest.mark.parametrize("fastapi_loaded", [False, True])
async def test_a_failing_route_under_a_mount_opens_only_its_own_breaker(
    fastapi_loaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: every route under /api was one route, "/api/*" ("/api" once FastAPI was
    imported: its route list wraps a Mount too), with one breaker: three 500s of
    /api/bad shed /api/good/1 with 503."""
    import fastapi.routing

    if fastapi_loaded:  # routes.flat_routes then lists routes through FastAPI's helper
        monkeypatch.setitem(sys.modules, "fastapi.routing", fastapi.routing)
    else:
        monkeypatch.delitem(sys.modules, "fastapi.routing")
    app = _mounted_app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        bad = [(await client.get("/api/bad")).status_code for _ in range(4)]
        good = await client.get("/api/good/1")
        v2 = await client.get("/v2/bad")
        unknown = await client.get("/api/nothing-here")
    assert bad == [500, 500, 500, 503]
    assert (good.status_code, v2.status_code, unknown.status_code) == (200, 500, 404)
    engine = app.middleware_stack.app.engine  # type: ignore[attr-defined]
    names = sorted({plan.route for plan in engine._plans.values()})
    assert names == ["/api/*", "/api/bad", "/api/good/{item}", "/v2/bad"]


# ------------------------------------------- 4. the instrumentation's span, annotated early


async def test_an_instrumented_span_names_the_layer_inside_the_app_that_refused() -> None:
    """With the ASGI instrumentation outside the middleware, its span is annotated as the
    last body message goes out, before the middleware settles the outcome. A 429 of
    `Depends(limit)` (or a 503 after an outbound breaker refused) said decided_by=app,
    outcome=served there, while our own span and the metrics said ratelimit/rejected."""
    from fastapi import Depends, FastAPI
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    from fidelity_mw.fastapi import Fidelity
    from test_telemetry_helpers import call, counter_values, pipeline

    otel = pipeline(decision_events="non_allow")
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/once", dependencies=[Depends(fidelity.limit("1/h"))])
    async def once() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=FakeClock(), observer=otel.telemetry
    )
    fidelity.install(app)
    outer = OpenTelemetryMiddleware(
        app, tracer_provider=otel.tracer_provider, exclude_spans=["send", "receive"]
    )
    try:
        codes = [(await call(outer, "/once")).status_code for _ in range(2)]
        spans = otel.finished()
        requests = counter_values(
            otel.metrics, "fidelity.requests", "fidelity.decided_by", "fidelity.outcome"
        )
    finally:
        otel.shutdown()
    assert codes == [200, 429]
    said = [
        (
            s.attributes.get("fidelity.decided_by", "app"),
            s.attributes.get("fidelity.outcome", "served"),
        )
        for s in spans
    ]
    assert said == [("app", "served"), ("ratelimit", "rejected")]
    assert requests == {("app", "served"): 1, ("ratelimit", "rejected"): 1}


# ------------------------------------------- 5. the key hash of an API-keyed request


async def test_an_api_keyed_request_carries_the_key_hash_its_admin_row_shows() -> None:
    """docs/admin.md: a rate-limit key's hash on the state page is the traces'
    `fidelity.client.key_hash`, "so a row can be matched to its traces". For a limit
    keyed by a header the span had no key hash at all (only an address was hashed), and
    with the providers given to the middleware the page hashed with a salt of its own."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from fidelity_mw import Engine
    from fidelity_mw.admin import AdminApp
    from test_telemetry_helpers import pipeline

    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    otel = pipeline(decision_events="non_allow")
    limit = RateLimit(name="per-key", rate="10/min", key="header:X-Api-Key", match="/ok")
    engine = Engine(Policy(rate_limits=(limit,)), clock=FakeClock())
    app = Starlette(routes=[Route("/ok", ok), Mount("/_fidelity", app=AdminApp(engine))])
    app.add_middleware(
        FidelityMiddleware,
        engine=engine,
        tracer_provider=otel.tracer_provider,  # the documented wiring (docs/telemetry.md)
        meter_provider=otel.meter_provider,
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            keyed = await client.get("/ok", headers={"x-api-key": "key-of-tenant-7"})
            plain = await client.get("/ok")  # no key: counted by its address
            state = (await client.get("/_fidelity/state.json")).json()
        spans = [s for s in otel.finished() if s.attributes.get("http.route") == "/ok"]
    finally:
        otel.shutdown()
    assert (keyed.status_code, plain.status_code) == (200, 200)
    hashes = [s.attributes.get("fidelity.client.key_hash") for s in spans]
    rows = {row["key_hash"] for row in state["limiter_keys"]}
    assert None not in hashes
    assert len(hashes) == 2
    assert set(hashes) == rows  # one row per key, each matched by its request's span
    assert "key-of-tenant-7" not in str([dict(s.attributes) for s in spans])


# ------------------------------------------- 6. an error after the response went out


async def test_a_failing_background_task_after_a_whole_response_is_no_breaker_failure() -> None:
    """Starlette runs a response's background task after its last body message, inside
    the app call: its exception reached the middleware as the app's, and a failing e-mail
    task opened the breaker of a route that answered every signup: 503s after three."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from fidelity_mw import current

    seen = []

    async def send_mail() -> None:
        raise ConnectionError("smtp down")

    async def signup(request: object) -> PlainTextResponse:
        seen.append(current())
        return PlainTextResponse("welcome", background=BackgroundTask(send_mail))

    app = Starlette(routes=[Route("/signup", signup)])
    policy = Policy(breaker=BreakerConfig(min_calls=3))
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        codes = [(await client.get("/signup")).status_code for _ in range(5)]
    assert codes == [200] * 5
    assert [(c.decided_by, c.outcome) for c in seen if c] == [("app", "served")] * 5


async def test_an_endpoint_override_under_a_mount_is_enforced_by_the_outer_middleware() -> None:
    """`@fidelity.deadline(...)` on an endpoint of a mounted FastAPI sub-app: the
    middleware on the outer app looked for the endpoint among the outer app's own
    routes only, and served the request with the policy's 30 s deadline."""
    from fastapi import FastAPI

    from fidelity_mw import current
    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()
    seen = []
    sub = FastAPI()

    @sub.get("/reports/{rid}")
    @fidelity.deadline(250)
    async def report(rid: str) -> dict[str, str]:
        seen.append(current())
        return {"rid": rid}

    app = FastAPI()
    app.mount("/v1", sub)
    clock = FakeClock()
    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=clock, telemetry=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        response = await client.get("/v1/reports/7", headers={"x-request-timeout-ms": "5000"})
    assert response.status_code == 200
    [ctx] = seen
    assert ctx is not None
    assert ctx.route == "/v1/reports/{rid}"
    assert ctx.remaining_s() == pytest.approx(0.25)  # the endpoint's cap, not 5 s


# ------------------------------------------- 7. every problem of a policy at once


def test_a_bad_top_level_value_is_reported_beside_a_bad_table() -> None:
    """docs/policy.md: validation reports every problem at once. A table with a problem
    stopped the policy (or the table holding it) from being built, and with it the
    checks of its plain values: `trusted_proxies = ["nope"]` surfaced only after the
    `[[rate_limit]]` was fixed, `attempt_timeout_ms = 0` only after the `retry`."""
    problems = _problems(
        trusted_proxies=["nope"],
        rate_limit_headers="sometimes",
        rate_limit=[{"name": "a", "rate": "1/fortnight"}],
        upstream=[{"host": "x", "attempt_timeout_ms": 0, "retry": {"attempts": 0}}],
        route=[{"match": "/r", "deadline_ms": -1, "breaker": {"min_calls": 0}}],
    )
    assert set(problems) == {
        "trusted_proxies",
        "rate_limit_headers",
        "rate_limit[0].rate",
        "upstream[0].attempt_timeout_ms",
        "upstream[0].retry.attempts",
        "route[0].deadline_ms",
        "route[0].breaker.min_calls",
    }
    assert problems["trusted_proxies"].startswith('item 0: "nope" is not an IP network')


def test_plain_values_next_to_a_bad_table_are_checked_as_given() -> None:
    """Only the plain values are checked there: good ones add no problem."""
    problems = _problems(
        trusted_proxies=["10.0.0.0/8"],
        priority_header="x-priority",
        route=[{"match": "/r", "methods": ["get"], "breaker": {"min_calls": 0}}],
        upstream=[{"host": "x", "instances": ["http://10.0.0.7:80"], "retry": {"jitter": "no"}}],
    )
    assert set(problems) == {"route[0].breaker.min_calls", "upstream[0].retry.jitter"}


# ------------------------------------------- 8. an on_reject response that fails


async def test_a_hook_response_that_fails_before_starting_records_the_status_sent() -> None:
    """The default 429 goes out when the hook's response fails before it starts; the
    request (and its span's http.response.status_code) kept the hook's 418."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from test_telemetry_helpers import call, pipeline

    class Broken(Response):
        async def __call__(self, scope: object, receive: object, send: object) -> None:
            raise RuntimeError("template missing")

    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    otel = pipeline(decision_events="non_allow")
    app = Starlette(routes=[Route("/ok", ok)])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(rate_limits=(RateLimit(name="tight", rate="1/min"),)),
        clock=FakeClock(),
        observer=otel.telemetry,
        on_reject=lambda ctx, decision: Broken("x", status_code=418),
    )
    try:
        codes = [(await call(app, "/ok")).status_code for _ in range(2)]
        statuses = [s.attributes["http.response.status_code"] for s in otel.finished()]
    finally:
        otel.shutdown()
    assert codes == [200, 429]
    assert statuses == [200, 429]
