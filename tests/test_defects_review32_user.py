"""Review 32, the user's side: what an engineer adopting fidelity_mw on a FastAPI service
meets in the FastAPI forms, the CLI and the policy reference."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random
from fidelity_mw.tools.cli import main


def _get(app: Any, paths: list[str], headers: dict[str, str] | None = None) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [await client.get(path, headers=headers) for path in paths]

    return asyncio.run(run())


# ------------------------------------------------ a form limit's 429 costs no other form quota


def _account_app(*, middleware: bool, search_cost: int = 1) -> FastAPI:
    """An app-wide limit shared by name ("account", 5/min) on every route, and a tight
    one of /search's own (1/min; each request costing `search_cost`, from a function)."""
    clock = FakeClock()
    fidelity = Fidelity(clock=clock, rng=seeded_random(0))
    app = FastAPI(dependencies=[Depends(fidelity.limit("5/min", name="account"))])

    @app.get(
        "/search",
        dependencies=[Depends(fidelity.limit("1/min", name="search", cost=lambda r: search_cost))],
    )
    async def search() -> dict[str, str]:
        return {}

    @app.get("/profile")
    async def profile() -> dict[str, str]:
        return {}

    if middleware:
        app.add_middleware(FidelityMiddleware, policy=Policy(), clock=clock, telemetry=False)
    fidelity.install(app)
    return app


@pytest.mark.parametrize("middleware", [True, False], ids=["middleware", "forms-alone"])
def test_a_form_limits_429_gives_back_what_the_routes_other_form_limits_charged(
    middleware: bool,
) -> None:
    """A client retrying against /search's own 1/min limit was refused four times, and each
    refusal spent a unit of its app-wide "account" limit, which the earlier dependency had
    charged: the client, served once, was then refused on /profile too. The middleware's
    own limits get their units back when a dependency refuses; the forms' did not."""
    app = _account_app(middleware=middleware)
    statuses = [r.status_code for r in _get(app, ["/search"] * 5)]
    assert statuses == [200, 429, 429, 429, 429]
    profile = _get(app, ["/profile"])[0]
    assert profile.status_code == 200
    # served twice (one /search, this /profile): 5 - 2 units left
    assert '"account";r=3;' in profile.headers["ratelimit"]


def test_a_cost_over_the_burst_gives_back_the_other_form_limits_units_too() -> None:
    app = _account_app(middleware=True, search_cost=2)  # never admitted by a burst of 1
    statuses = [r.status_code for r in _get(app, ["/search"] * 3)]
    assert statuses == [429, 429, 429]
    profile = _get(app, ["/profile"])[0]
    assert '"account";r=4;' in profile.headers["ratelimit"]


def test_a_state_refusal_of_a_form_limit_gives_back_the_other_form_limits_units() -> None:
    """`on_error = "closed"`: a form limit whose store call fails answers 503; the units an
    earlier form limit charged for the request come back."""

    class FailsFor(MemoryStore):
        def __init__(self) -> None:
            super().__init__(rng=seeded_random(0))
            self.failing = "search|"

        async def admit(self, breaker_key, breaker, limit_keys, limits, now, *args, **kw):  # type: ignore[no-untyped-def, override]
            if any(key.startswith(self.failing) for key in limit_keys):
                raise ConnectionError("redis away")
            return await super().admit(breaker_key, breaker, limit_keys, limits, now, *args, **kw)

    clock = FakeClock()
    policy = Policy.from_dict({"state": {"on_error": "closed"}})
    fidelity = Fidelity(policy=policy, clock=clock, store=FailsFor())
    app = FastAPI(dependencies=[Depends(fidelity.limit("5/min", name="account"))])

    @app.get("/search", dependencies=[Depends(fidelity.limit("1/min", name="search"))])
    async def search() -> dict[str, str]:
        return {}

    @app.get("/profile")
    async def profile() -> dict[str, str]:
        return {}

    fidelity.install(app)
    assert [r.status_code for r in _get(app, ["/search"] * 3)] == [503, 503, 503]
    assert '"account";r=4;' in _get(app, ["/profile"])[0].headers["ratelimit"]


# ------------------------------------------------ install(app) reaches the apps mounted on it


@pytest.mark.parametrize("mounted_after_install", [False, True], ids=["before", "after"])
def test_install_answers_and_documents_the_forms_of_a_mounted_app(
    mounted_after_install: bool,
) -> None:
    """`fidelity.install(app)` left the FastAPI apps mounted on it as they were: a mounted
    app answers its own exceptions and serves its own schema, so the 429 of a form there
    came in FastAPI's `{"detail": ...}` shape and its `/v2/openapi.json` listed no 429."""
    clock = FakeClock()
    fidelity = Fidelity(clock=clock)
    v2 = FastAPI()

    @v2.get("/things", dependencies=[Depends(fidelity.limit("1/min"))])
    async def things() -> dict[str, str]:
        return {}

    app = FastAPI()
    if mounted_after_install:
        fidelity.install(app)  # as `Fidelity(app)` does, when the app is created
        app.mount("/v2", v2)
    else:
        app.mount("/v2", v2)
        fidelity.install(app)
    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=clock, telemetry=False)
    first, refused, schema = _get(app, ["/v2/things", "/v2/things", "/v2/openapi.json"])
    assert (first.status_code, refused.status_code) == (200, 429)
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:fidelity-mw:problem:rate-limited"
    assert refused.headers["retry-after"] == "60"
    responses = schema.json()["paths"]["/things"]["get"]["responses"]
    assert "429" in responses


def test_install_keeps_a_mounted_apps_own_handler_and_documents_once() -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    from fidelity_mw.fastapi import RateLimited

    fidelity = Fidelity(clock=FakeClock())
    v2 = FastAPI()

    @v2.exception_handler(RateLimited)
    async def own(request: Request, exc: RateLimited) -> JSONResponse:
        return JSONResponse({"slow": "down"}, status_code=429)

    @v2.get("/things", dependencies=[Depends(fidelity.limit("1/min"))])
    async def things() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.mount("/v2", v2)
    fidelity.install(app)
    fidelity.install(app)  # twice: one handler, one schema wrapper
    _, refused = _get(app, ["/v2/things", "/v2/things"])
    assert refused.json() == {"slow": "down"}
    assert "429" in v2.openapi()["paths"]["/things"]["get"]["responses"]


# ------------------------------------------------ check: a Redis URL without the Redis client


def test_check_warns_when_the_redis_client_a_state_url_needs_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pip install fidelity-mw` (no extra) and `url = "redis://..."`: check said "ok",
    then the app failed at startup with a PolicyError naming the extra."""
    path = tmp_path / "fidelity.toml"
    path.write_text('version = 1\n\n[state]\nurl = "redis://:s3cret@cache.internal:6379/0"\n')
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` fails, as without it
    assert main(["check", str(path)]) == 0  # the file is valid: a warning
    out = capsys.readouterr().out
    assert f"{path}:4: warning: state.url: redis:// needs the Redis client" in out
    assert "pip install 'fidelity-mw[redis]'" in out
    assert "s3cret" not in out
    assert main(["check", "--strict", str(path)]) == 1
    capsys.readouterr()
    monkeypatch.delitem(sys.modules, "redis")
    assert main(["check", "--strict", str(path)]) == 0  # installed: nothing to say


# ------------------------------------------------ map: a mounted app's forms by their path


def test_map_names_a_mounted_apps_form_routes_by_the_path_they_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`app.mount("/v2", v2)`: the map listed v2's `Depends(fidelity.limit)` as "route GET
    /things", a path the app does not serve (and that a route of the app itself may
    hold); the limit counts, and its default counter is named, `/v2/things`."""
    from fidelity_mw.tools.statemap import from_app

    (tmp_path / "mapped_mounts32.py").write_text(
        "from fastapi import Depends, FastAPI\n"
        "from fidelity_mw import FidelityMiddleware, Policy\n"
        "from fidelity_mw.fastapi import Fidelity\n"
        "fidelity = Fidelity()\n"
        "v2 = FastAPI()\n"
        "@v2.get('/things', dependencies=[Depends(fidelity.limit('1/min'))])\n"
        "@fidelity.deadline(500)\n"
        "async def things():\n"
        "    return {}\n"
        "app = FastAPI()\n"
        "@app.get('/things', dependencies=[Depends(fidelity.limit('5/min'))])\n"
        "async def old_things():\n"
        "    return {}\n"
        "app.mount('/v2', v2)\n"
        "app.add_middleware(FidelityMiddleware, policy=Policy())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    smap = from_app("mapped_mounts32:app")
    forms = sorted((r.layer, r.subject) for r in smap.layers if r.config.startswith("fidelity."))
    assert forms == [
        ("deadline", "route GET /v2/things: @fidelity.deadline"),
        ("ratelimit", "route GET /things: Depends(fidelity.limit('5/min')), per client_ip"),
        ("ratelimit", "route GET /v2/things: Depends(fidelity.limit('1/min')), per client_ip"),
    ]
