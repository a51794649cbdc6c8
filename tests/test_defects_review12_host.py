"""Review 12: Host route naming follow-ups, each with the test that failed before its fix.

- The host was not part of a route's name: one template (`/items/{id}`) under two hosts
  shared one breaker and one default `Depends(fidelity.limit)` counter. A request a
  `Host` serves is now named `<host pattern><template>` (`api.example.com/items/{id}`);
  apps without a `Host` keep their names.
- A request whose Host matched but none of the host's routes did fell through to later
  outer routes, which Starlette never reaches: it is now the host's `<host>/*`.
- `fidelity-mw check` and the engine agree on route shadowing now that GET covers HEAD.
"""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Host, Route, Router

from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy
from fidelity_mw.engine import Engine
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.testing import FakeClock, seeded_random
from fidelity_mw.tools.check import check_file

pytestmark = pytest.mark.anyio


def _two_hosts(clock: FakeClock) -> FastAPI:
    fidelity = Fidelity()
    api, admin = FastAPI(), FastAPI()
    broken = {"api": False}

    @api.get("/items/{item}", dependencies=[Depends(fidelity.limit("1/min"))])
    async def api_item(item: int) -> dict[str, str]:
        if broken["api"]:
            raise HTTPException(500, "down")
        return {"host": "api"}

    @admin.get("/items/{item}", dependencies=[Depends(fidelity.limit("1/min"))])
    async def admin_item(item: int) -> dict[str, str]:
        return {"host": "admin"}

    fidelity.install(api)
    fidelity.install(admin)
    app = FastAPI()
    app.host("api.example.com", api)
    app.host("admin.example.com", admin)
    policy = Policy(breaker=BreakerConfig(consecutive_failures=1, open_s=60.0))
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(1), telemetry=False
    )
    app.state.broken = broken
    return app


async def _get(app: Any, host: str, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as c:
        return await c.get(path)


async def test_one_template_under_two_hosts_has_two_default_counters(clock: FakeClock) -> None:
    """Before: `Depends(fidelity.limit("1/min"))` on `/items/{item}` of both hosts
    counted in one counter named by the template: the api host's call spent the admin
    host's only request."""
    app = _two_hosts(clock)
    assert (await _get(app, "api.example.com", "/items/1")).status_code == 200
    assert (await _get(app, "admin.example.com", "/items/1")).status_code == 200
    assert (await _get(app, "admin.example.com", "/items/2")).status_code == 429


async def test_one_template_under_two_hosts_has_two_breakers(clock: FakeClock) -> None:
    """Before: a failing `/items/{item}` on one host opened the breaker the other host's
    `/items/{item}` counted against: the healthy host shed with 503."""
    app = _two_hosts(clock)
    app.state.broken["api"] = True
    assert (await _get(app, "api.example.com", "/items/1")).status_code == 500
    assert (await _get(app, "admin.example.com", "/items/1")).status_code == 200


def _engine(app: Any) -> Any:
    return FidelityMiddleware(app, policy=Policy(), telemetry=False).engine


def _scope(path: str, host: str, method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": [(b"host", host.encode())]}


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def test_names_carry_the_host_pattern_only_under_a_host() -> None:
    hosted = Starlette(
        routes=[
            Host("{tenant}.example.com", app=Router(routes=[Route("/items/{id}", _ok)])),
            Route("/items/{id}", _ok),
        ]
    )
    plain = Starlette(routes=[Route("/items/{id}", _ok)])
    assert _engine(hosted).plan_for(_scope("/items/1", "acme.example.com")).route == (
        "{tenant}.example.com/items/{id}"
    )
    # another host: the outer route's own name, as it was
    assert _engine(hosted).plan_for(_scope("/items/1", "other.org")).route == "/items/{id}"
    assert _engine(plain).plan_for(_scope("/items/1", "acme.example.com")).route == "/items/{id}"
    # method not allowed under the host: the host's route, other verb
    post = _engine(hosted).plan_for(_scope("/items/1", "acme.example.com", "POST"))
    assert post.route == "{tenant}.example.com/items/{id}"


def test_a_host_none_of_whose_routes_match_is_the_hosts_404() -> None:
    """Before: the host matched, none of its routes did, and naming went on to the outer
    `/items/{id}` route, which Starlette never reaches (the host's app answers 404): the
    host's misses counted against the outer route's breaker."""
    app = Starlette(
        routes=[
            Host("api.example.com", app=Router(routes=[Route("/users/{id}", _ok)])),
            Route("/items/{id}", _ok),
        ]
    )
    assert _engine(app).plan_for(_scope("/items/1", "api.example.com")).route == (
        "api.example.com/*"
    )


async def _app(scope: Any, receive: Any, send: Any) -> None:  # an app of its own
    await PlainTextResponse("raw")(scope, receive, send)


def test_a_host_whose_app_lists_no_routes_is_the_hosts() -> None:
    app = Starlette(routes=[Host("raw.example.com", app=_app), Route("/items/{id}", _ok)])
    assert _engine(app).plan_for(_scope("/items/1", "raw.example.com")).route == (
        "raw.example.com/*"
    )


# ---------------------------------------------------------------- check agrees on HEAD

_METHODS: list[list[str] | None] = [
    None,
    ["GET"],
    ["HEAD"],
    ["GET", "HEAD"],
    ["POST"],
    ["GET", "POST"],
]


def _toml(entries: list[tuple[str, list[str] | None]]) -> str:
    out = []
    for match, methods in entries:
        out.append(f'[[route]]\nmatch = "{match}"\nname = "r{len(out)}"\n')
        if methods is not None:
            out[-1] += f"methods = {methods!r}\n".replace("'", '"')
    return "\n".join(out)


@pytest.mark.parametrize(
    "third", [None, ["HEAD"]], ids=["no-entry-names-head", "another-names-head"]
)
def test_check_shadowing_agrees_with_the_engines_matching(
    tmp_path: Any, third: list[str] | None
) -> None:
    """A later route is reported "never used" exactly when the engine gives every request
    it would match (GET covering HEAD unless an entry names HEAD) to the earlier one."""
    for first, second in itertools.product(_METHODS, _METHODS):
        entries = [("/x*", first), ("/x", second)]
        if third is not None:
            entries.append(("/elsewhere", third))
        path = tmp_path / "fidelity.toml"
        path.write_text(_toml(entries))
        result = check_file(path)
        assert not result.errors, result.errors
        warned = any(w.path == "route[1].match" for w in result.warnings)
        engine = Engine(Policy.from_toml(path))
        methods = ["GET", "HEAD", "POST", "PUT"]
        served = {m: engine._route_config(m, "/x") for m in methods}
        never = all(cfg is None or cfg.name != "r1" for cfg in served.values())
        assert warned == never, (first, second, third)


def test_a_slash_redirect_under_a_host_is_still_seen() -> None:
    """With the host's misses named `<host>/*` instead of falling through, the router's
    trailing-slash redirect of the host's app (`/items/1/` to `/items/1`) must still be
    seen as one (charged only by "always" limits), as it was."""
    app = Starlette(
        routes=[Host("api.example.com", app=Router(routes=[Route("/items/{id}", _ok)]))]
    )
    policy = Policy.from_dict({"rate_limit": [{"name": "a", "rate": "5/s"}]})
    engine = FidelityMiddleware(app, policy=policy, telemetry=False).engine
    plan = engine.plan_for(_scope("/items/1/", "api.example.com"))
    assert (plan.route, plan.slash_redirect) == ("api.example.com/*", True)
    assert not engine.plan_for(_scope("/nothing/", "api.example.com")).slash_redirect
