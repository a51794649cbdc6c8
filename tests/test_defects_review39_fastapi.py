"""Review 39, the FastAPI forms as a user adopting them meets them.

- Two unnamed `fidelity.limit` dependencies of one route at the same rate (an app-wide
  `FastAPI(dependencies=[...])` one and the route's own) had one default name,
  `<route>:<rate>`, and so one counter: at another burst they fought over one GCRA
  state and the route refused every request, its first too; at the same burst (a
  `header:` key falling back to the address) each request paid twice.
- `@fidelity.breaker(...)` took anything: a dict (`{"failure_ratio": 0.2}`), a string.
  The route's plan could not be built from it, so the middleware let every request of
  the route through undecided (its rate limits and its deadline too).
- `fidelity.deadline(0)` raised a plain ValueError, outside the library's error tree.
- `fidelity.limit(..., name="")` was taken as a name: the limit counted on a counter
  named "" while its records said the route's default name.
"""

from __future__ import annotations

import logging
import sys

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.requests import Request

from fidelity_mw import FidelityMiddleware, Policy, PolicyError
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.testing import FakeClock
from fidelity_mw.tools.statemap import build

pytestmark = pytest.mark.anyio


async def statuses(app: FastAPI, path: str, n: int, **headers: str) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return [(await client.get(path, headers=headers)).status_code for _ in range(n)]


def app_with(fidelity: Fidelity, route_limit: object, clock: FakeClock) -> FastAPI:
    app = FastAPI(dependencies=[Depends(fidelity.limit("3/min"))])  # app-wide, unnamed

    @app.get("/orders", dependencies=[Depends(route_limit)])
    async def orders() -> dict[str, str]:
        return {"orders": "none"}

    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=clock, telemetry=False)
    fidelity.install(app)
    return app


async def test_a_route_limit_at_another_burst_does_not_refuse_every_request() -> None:
    fidelity = Fidelity()
    app = app_with(fidelity, fidelity.limit("3/min", burst=1), FakeClock())
    # the route's own: one now, then one per 20 s; the app-wide one: three now
    assert await statuses(app, "/orders", 3) == [200, 429, 429]


async def test_two_unnamed_limits_of_one_rate_each_count_once_per_request() -> None:
    fidelity = Fidelity()
    by_key = fidelity.limit("3/min", key="header:x-api-key")  # no key sent: the address
    app = app_with(fidelity, by_key, FakeClock())
    assert await statuses(app, "/orders", 4) == [200, 200, 200, 429]


async def test_the_second_speaks_under_a_name_of_its_own() -> None:
    fidelity = Fidelity()
    app = app_with(fidelity, fidelity.limit("3/min", burst=1), FakeClock())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        first = await client.get("/orders")
        refused = await client.get("/orders")
    assert first.status_code == 200
    # the route's own limit speaks under its own name; the app-wide one under the default
    assert '"/orders:3/min#2";r=0' in first.headers["ratelimit"]
    assert '"/orders:3/min";r=2' in first.headers["ratelimit"]
    assert refused.json()["limit"] == "/orders:3/min#2"


async def test_check_of_the_second_limit_reads_the_counter_it_counts_on() -> None:
    fidelity = Fidelity()
    own = fidelity.limit("3/min", burst=1)
    app = app_with(fidelity, own, FakeClock())

    @app.get("/room")
    async def room(request: Request) -> dict[str, bool]:
        return {"allowed": (await own.check(request, route="/orders")).allowed}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get("/orders")).status_code == 200
        # its one unit is spent (the app-wide limit has two left): not admitted now
        assert (await client.get("/room")).json() == {"allowed": False}


def test_the_map_shows_the_counter_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    fidelity = Fidelity()
    module = types.ModuleType("review39_forms_app")
    module.app = app_with(fidelity, fidelity.limit("3/min", burst=1), FakeClock())  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "review39_forms_app", module)
    smap = build("review39_forms_app:app")
    keys = [layer.key for layer in smap.layers if layer.config.startswith("fidelity.limit")]
    assert keys == ["<route>:3/min|{client}", "<route>:3/min#2|{client}"]


@pytest.mark.parametrize("bad", [{"failure_ratio": 0.2}, "strict", 5])
def test_a_breaker_form_that_is_no_breaker_is_refused_where_it_is_written(bad: object) -> None:
    with pytest.raises(PolicyError, match=r"fidelity\.breaker: expected a BreakerConfig"):
        Fidelity().breaker(bad)  # type: ignore[arg-type]


def test_a_dict_is_pointed_at_the_keywords() -> None:
    with pytest.raises(PolicyError, match=r"fidelity\.breaker\(\*\*\{'failure_ratio': 0\.2\}\)"):
        Fidelity().breaker({"failure_ratio": 0.2})  # type: ignore[arg-type]


async def test_true_and_false_stay_accepted(caplog: pytest.LogCaptureFixture) -> None:
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/on")
    @fidelity.breaker(True)
    async def on() -> dict[str, str]:
        return {}

    @app.get("/off")
    @fidelity.breaker(False)
    async def off() -> dict[str, str]:
        return {}

    policy = Policy.from_dict({"route": [{"match": "/o*", "deadline_ms": 100}]})
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        assert await statuses(app, "/on", 1) == [200]
        assert await statuses(app, "/off", 1) == [200]
        # decided, not passed through: the deadline header is read (0 ms: 504)
        assert await statuses(app, "/on", 1, **{"x-request-timeout-ms": "0"}) == [504]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("bad", [0, 2.5, True, 86_400_001])
def test_a_bad_deadline_is_a_policy_error(bad: object) -> None:
    with pytest.raises(PolicyError, match=r"fidelity\.deadline: expected a whole number"):
        Fidelity().deadline(bad)  # type: ignore[arg-type]


def test_an_empty_limit_name_is_refused() -> None:
    with pytest.raises(PolicyError, match=r"fidelity\.limit\('5/s'\)\.name: expected a non-empty"):
        Fidelity().limit("5/s", name="")


# ---------------------------------------------------------------- without the middleware


def versioned(fidelity: Fidelity, failing: bool) -> FastAPI:
    """A versioned sub-app, as `app.mount("/v1", v1)` serves one: the same templates."""
    from fastapi import APIRouter, HTTPException

    sub = FastAPI()
    router = APIRouter(route_class=fidelity.route_class)

    @router.get("/orders/{order}", dependencies=[Depends(fidelity.limit("2/min"))])
    @fidelity.breaker(consecutive_failures=2, open_s=30.0, open_min_s=30.0, open_jitter=0.0)
    async def orders(order: int) -> dict[str, int]:
        if failing:
            raise HTTPException(500, "down")
        return {"order": order}

    sub.include_router(router)
    return sub


def two_versions() -> FastAPI:
    fidelity = Fidelity(clock=FakeClock())
    app = FastAPI()
    app.mount("/v1", versioned(fidelity, failing=True))
    app.mount("/v2", versioned(fidelity, failing=False))
    fidelity.install(app)
    return app


async def test_a_mounted_apps_failures_do_not_open_another_mounts_breaker() -> None:
    app = two_versions()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        v1 = [(await client.get("/v1/orders/1")).status_code for _ in range(3)]
        v2 = await client.get("/v2/orders/1")
    assert v1 == [500, 500, 503]  # its own breaker opened
    assert v2.status_code == 200  # not /v1's: a route of its own
    # named by the whole path, as the middleware names it
    assert v2.headers["ratelimit"] == '"/v2/orders/{order}:2/min";r=1;t=30'


async def test_the_root_path_of_the_server_is_left_out_as_the_middleware_does() -> None:
    app = two_versions()
    transport = httpx.ASGITransport(app=app, root_path="/svc")
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        served = await client.get("/svc/v2/orders/1")
    assert served.status_code == 200
    assert served.headers["ratelimit"] == '"/v2/orders/{order}:2/min";r=1;t=30'


# ---------------------------------------------------------------- a key function that fails


def tenant(request: Request) -> str:
    return request.headers["x-tenant"]  # a KeyError where the header is missing


def deny(request: Request) -> str:
    from fastapi import HTTPException

    raise HTTPException(401, "who are you?")


async def test_a_key_function_that_raises_counts_the_request_by_its_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/work", dependencies=[Depends(fidelity.limit("2/min", key=tenant))])
    async def work() -> dict[str, str]:
        return {}

    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=FakeClock(), telemetry=False)
    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        # no 500 of ours for the route breaker to count: the address's counter
        assert await statuses(app, "/work", 3) == [200, 200, 429]
        assert await statuses(app, "/work", 3, **{"x-tenant": "acme"}) == [200, 200, 429]
    assert any("key function" in r.getMessage() for r in caplog.records)


async def test_an_http_exception_from_the_key_function_is_the_apps_answer() -> None:
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/work", dependencies=[Depends(fidelity.limit("2/min", key=deny))])
    async def work() -> dict[str, str]:
        return {}

    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=FakeClock(), telemetry=False)
    assert await statuses(app, "/work", 3) == [401, 401, 401]


# ---------------------------------------------------------------- OpenAPI


@pytest.mark.parametrize("spelling", [429, "429"])
async def test_the_apps_own_429_entry_is_kept_under_either_spelling(spelling: object) -> None:
    fidelity = Fidelity()
    app = FastAPI()

    @app.get(
        "/a",
        responses={spelling: {"description": "Our own words"}},  # type: ignore[dict-item]
        dependencies=[Depends(fidelity.limit("5/s"))],
    )
    async def a() -> dict[str, str]:
        return {}

    fidelity.install(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        schema = (await client.get("/openapi.json")).json()
    responses = schema["paths"]["/a"]["get"]["responses"]
    assert responses["429"] == {"description": "Our own words"}


# ---------------------------------------------------------------- an identity with no text


class Row:
    """A user as an ORM returns it: no `__str__` or `__repr__` of its own."""

    def __init__(self, uid: str) -> None:
        self.id = uid


async def row_of(request: Request) -> Row:
    return Row(request.headers.get("authorization", "anon"))


def row_key(request: Request) -> Row:
    return Row(request.headers.get("authorization", "anon"))


@pytest.mark.parametrize("key", [Depends(row_of), row_key], ids=["dependency", "function"])
async def test_an_identity_whose_text_is_its_address_still_meets_a_limit(
    key: object, caplog: pytest.LogCaptureFixture
) -> None:
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/work", dependencies=[Depends(fidelity.limit("2/min", key=key))])  # type: ignore[arg-type]
    async def work() -> dict[str, str]:
        return {}

    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=FakeClock(), telemetry=False)
    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        # a new key per request was no limit at all: the address counts instead, said
        assert await statuses(app, "/work", 3, authorization="Bearer ann") == [200, 200, 429]
    assert any("return the identity's id" in r.getMessage() for r in caplog.records)


async def test_an_identity_with_a_text_of_its_own_keys_the_limit() -> None:
    from dataclasses import dataclass

    @dataclass
    class User:
        id: str

    async def user(request: Request) -> User:
        return User(request.headers["authorization"])

    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/work", dependencies=[Depends(fidelity.limit("2/min", key=Depends(user)))])
    async def work() -> dict[str, str]:
        return {}

    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=FakeClock(), telemetry=False)
    assert await statuses(app, "/work", 3, authorization="ann") == [200, 200, 429]
    assert await statuses(app, "/work", 1, authorization="bob") == [200]  # a counter of his own


async def test_without_install_the_outermost_app_names_them_too() -> None:
    fidelity = Fidelity(clock=FakeClock())
    app = FastAPI()
    app.mount("/v1", versioned(fidelity, failing=True))
    app.mount("/v2", versioned(fidelity, failing=False))  # (no install: {"detail"} bodies)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        v1 = [(await client.get("/v1/orders/1")).status_code for _ in range(3)]
        v2 = await client.get("/v2/orders/1")
    assert v1 == [500, 500, 503]
    assert v2.status_code == 200
    assert v2.headers["ratelimit"] == '"/v2/orders/{order}:2/min";r=1;t=30'


async def test_a_routers_routes_under_a_plain_mount_are_their_own_routes() -> None:
    from fastapi import APIRouter
    from starlette.routing import Mount

    fidelity = Fidelity(clock=FakeClock())
    router = APIRouter(route_class=fidelity.route_class)

    @router.get("/items", dependencies=[Depends(fidelity.limit("5/min"))])
    @fidelity.breaker(consecutive_failures=1, open_s=30.0, open_min_s=30.0, open_jitter=0.0)
    async def items() -> dict[str, str]:
        return {}

    app = FastAPI(routes=[Mount("/api", routes=router.routes)])
    fidelity.install(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        served = await client.get("/api/items")
    # named "!unmatched" before (every such route one breaker, its decorator unread)
    assert served.headers["ratelimit"] == '"/api/items:5/min";r=4;t=12'
    assert (
        fidelity.engine.plan_for(
            {"type": "http", "method": "GET", "path": "/api/items", "app": app}
        ).route
        == "/api/items"
    )
