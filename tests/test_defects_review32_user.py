"""Review 32, the user's side: what an engineer adopting fidelity_mw on a FastAPI service
meets in the FastAPI forms, the CLI and the policy reference."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI

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


# ------------------------------------------------ the policy reference against the loader


def _placed(table: str, key: str, value: object) -> dict[str, Any]:
    """A policy holding `value` at `table.key` (one entry for an array of tables)."""
    entry = {key: value}
    if table == "":
        return entry
    if table in ("rate_limit", "route", "upstream"):
        return {table: [entry]}
    if table.startswith("upstream."):
        return {"upstream": [{table.removeprefix("upstream."): entry}]}
    return {table: entry}


# what a key's bound needs of its neighbours to be reachable (the cross-checks the
# reference states in words: "not below base_ms", "must not exceed the burst", ...)
_COMPANIONS: dict[str, dict[str, object]] = {
    "deadline.max_ms": {"default_ms": 1},
    "rate_limit.cost": {"burst": 1_000_000},
    "breaker.slow_call_ms": {"slow_call_ratio": 0.5},
    "breaker.slow_call_ratio": {"slow_call_ms": 100},
    "concurrency.min_limit": {"max_limit": 1_000_000},
    "concurrency.sheddable_share": {"default_share": 1},
    "upstream.retry.base_ms": {"max_ms": 600_000},
    "upstream.retry.max_ms": {"base_ms": 0},
}


def _range_cases(allowed: str) -> list[tuple[float, bool]]:
    """(value, accepted) at and just past each bound of a documented numeric range."""
    import re

    def num(text: str) -> float:
        return float(text.replace("_", ""))

    ints = re.match(r"^([\d_]+) \.\. ([\d_]+)(;|$)", allowed)
    if ints:
        lo, hi = int(num(ints[1])), int(num(ints[2]))
        return [(lo, True), (hi, True), (lo - 1, False), (hi + 1, False)]
    numbers = re.match(r"^(>=|>) ([\d_.]+), <= ([\d_.]+)(;|$)", allowed)
    if numbers:
        lo, hi = num(numbers[2]), num(numbers[3])
        return [(lo, numbers[1] == ">="), (hi, True), (lo - 0.001, False), (hi + 0.001, False)]
    return []


def test_every_documented_numeric_range_is_the_loaders_and_every_default_the_built_value() -> None:
    """docs/policy.md's key table is generated from the dataclasses; this walks it the
    other way, through `Policy.from_dict` as a file is loaded: each documented bound is
    accepted, one step past it refused naming the key, and each documented default is
    what a section built from an empty table holds."""
    import dataclasses

    from fidelity_mw import PolicyError
    from fidelity_mw.policy.reference import key_docs, toml_value

    walked = 0
    for doc in key_docs():
        for value, accepted in _range_cases(doc.allowed):
            data = _placed(doc.table, doc.key, value)
            section = data if doc.table == "" else data[doc.table.split(".")[0]]
            target = section[0] if isinstance(section, list) else section
            if doc.table.startswith("upstream."):
                target = target[doc.table.removeprefix("upstream.")]
            target.update(_COMPANIONS.get(doc.path, {}))
            refused: list[str] | None = None
            try:
                Policy.from_dict(data)
            except PolicyError as exc:
                refused = [
                    f"{issue.path.replace('[0]', '')}: {issue.message}" for issue in exc.issues
                ]
            where = f"{doc.path} = {value} (documented {doc.allowed!r}): {refused}"
            if accepted:
                assert refused is None, where
            else:
                assert refused is not None, where
                assert [problem.split(":")[0] for problem in refused] == [doc.path], where
            walked += 1
    assert walked >= 150  # every numeric key of every table, not a silently empty walk

    built = Policy.from_dict(
        {"rate_limit": [{}], "route": [{}], "upstream": [{"hedge": {}}], "concurrency": {}}
    )
    sections: dict[str, Any] = {
        "": built,
        "state": built.state,
        "deadline": built.deadline,
        "rate_limit": built.rate_limits[0],
        "breaker": built.breaker,
        "route": built.routes[0],
        "concurrency": built.concurrency,
        "upstream": built.upstreams[0],
        "upstream.retry": built.upstreams[0].retry,
        "upstream.hedge": built.upstreams[0].hedge,
    }
    for doc in key_docs():
        obj = sections[doc.table]
        attrs = {f.metadata.get("toml", f.name): f.name for f in dataclasses.fields(obj)}
        assert toml_value(getattr(obj, attrs[doc.key])) == doc.default, doc.path


# ------------------------------------------------ migration.md's translations, side by side


def _tenacity_run(answers: list[int]) -> tuple[int, int, list[float]]:
    """(last status, calls, waits) of a tenacity-decorated call against `answers`."""
    import tenacity

    calls: list[int] = []
    sleeps: list[float] = []

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential(multiplier=0.1, max=0.3),
        retry=tenacity.retry_if_result(lambda status: status == 503),
        retry_error_callback=lambda state: state.outcome.result(),  # the last answer
        sleep=sleeps.append,
    )
    def call() -> int:
        calls.append(1)
        return answers[len(calls) - 1]

    return call(), len(calls), sleeps


def _fidelity_run(answers: list[int]) -> tuple[int, int, list[float]]:
    """The same through FidelityTransport with migration.md's `retry` table."""
    from fidelity_mw import FidelityTransport

    retry = {"attempts": 4, "jitter": "none", "base_ms": 100, "max_ms": 300, "on_status": [503]}
    policy = Policy.from_dict({"upstream": [{"host": "users.internal", "retry": retry}]})
    clock = FakeClock()
    calls: list[int] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(answers[len(calls) - 1])

    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=policy, clock=clock, rng=seeded_random(0)
    )

    async def fetch() -> int:
        async with httpx.AsyncClient(transport=transport, base_url="http://users.internal") as c:
            return (await c.get("/users/1")).status_code

    status = asyncio.run(fetch())
    return status, len(calls), clock.sleeps


@pytest.mark.parametrize("failures", range(6))
def test_tenacity_translation_makes_the_same_calls_and_waits(failures: int) -> None:
    """migration.md: `stop_after_attempt(n)` is `attempts = n`, `wait_exponential(
    multiplier=m, max=M)` is `jitter = "none"` with `base_ms = m x 1000`, `max_ms = M x
    1000`, `retry_if_result(lambda r: r.status_code == 503)` is `on_status = [503]`: an
    upstream failing k times is called as often, with the same waits, either way."""
    answers = [503] * failures + [200]
    status, calls, sleeps = _fidelity_run(answers)
    expected_status, expected_calls, expected_sleeps = _tenacity_run(answers)
    assert (status, calls) == (expected_status, expected_calls)
    assert sleeps == pytest.approx(expected_sleeps)


def test_pybreaker_translation_opens_probes_and_closes_on_the_same_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """migration.md: `fail_max=n, reset_timeout=s` is `consecutive_failures = n`, `open_s
    = open_min_s = s`, `open_jitter = 0`, `half_open_probes = 1`. The same script of
    outcomes and times reaches the upstream on the same calls under both."""
    import datetime as dt

    import pybreaker

    from fidelity_mw import CircuitOpen, FidelityTransport

    now = [0.0]
    epoch = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    class FrozenDatetime(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
            return epoch + dt.timedelta(seconds=now[0])

    monkeypatch.setattr(pybreaker, "datetime", FrozenDatetime)
    breaker = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=10)

    policy = Policy.from_dict(
        {
            "upstream": [
                {
                    "host": "payments.internal",
                    "retry": {"attempts": 1},
                    "breaker": {
                        "consecutive_failures": 3,
                        "open_s": 10,
                        "open_min_s": 10,
                        "open_jitter": 0,
                        "half_open_probes": 1,
                    },
                }
            ]
        }
    )
    clock = FakeClock()
    outcome = ["ok"]
    reached: list[str] = []

    def payments(request: httpx.Request) -> httpx.Response:
        reached.append(outcome[0])
        return httpx.Response(200 if outcome[0] == "ok" else 500)

    transport = FidelityTransport(
        httpx.MockTransport(payments), policy=policy, clock=clock, rng=seeded_random(0)
    )
    client = httpx.AsyncClient(transport=transport, base_url="http://payments.internal")

    def theirs() -> bool:
        """Whether pybreaker let the call reach the upstream."""
        before = len(reached)

        def charge() -> None:
            reached.append(outcome[0])
            if outcome[0] != "ok":
                raise RuntimeError("500")

        with contextlib.suppress(RuntimeError, pybreaker.CircuitBreakerError):
            breaker.call(charge)
        return len(reached) > before

    def mine() -> bool:
        before = len(reached)
        with contextlib.suppress(CircuitOpen):
            asyncio.run(client.post("/charge"))
        return len(reached) > before

    # (seconds later, the upstream's answer if called)
    script = [(0, "fail")] * 3 + [(1, "ok"), (10, "fail"), (5, "ok"), (6, "ok"), (0, "ok")]
    script += [(0, "fail"), (0, "fail"), (0, "ok"), (0, "fail"), (0, "fail"), (0, "fail")]
    script += [(0, "ok"), (9.5, "ok"), (0.5, "ok")]
    pybreaker_reached: list[bool] = []
    fidelity_reached: list[bool] = []
    for later, answer in script:
        now[0] += later
        outcome[0] = answer
        pybreaker_reached.append(theirs())
    for later, answer in script:
        clock.advance(later)
        outcome[0] = answer
        fidelity_reached.append(mine())
    assert fidelity_reached == pybreaker_reached
    assert pybreaker_reached.count(False) >= 4  # the script does reach the open breaker


# ------------------------------------------------ messages: a table switched with a boolean


@pytest.mark.parametrize(
    ("data", "path", "fix"),
    [
        ({"upstream": [{"host": "h", "retry": False}]}, "upstream[0].retry", "attempts = 1"),
        ({"upstream": [{"host": "h", "hedge": True}]}, "upstream[0].hedge", "hedge = {}"),
        ({"concurrency": False}, "concurrency", "leave [concurrency] out"),
        ({"deadline": False}, "deadline", "default_ms = false"),
    ],
)
def test_a_boolean_where_a_table_goes_names_the_way_to_say_it(
    data: dict[str, Any], path: str, fix: str
) -> None:
    """`retry = false` (no retries for this host, as `breaker = false` is no breaker) said
    only "expected a table, got boolean false"."""
    from fidelity_mw import PolicyError

    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(data)
    (issue,) = caught.value.issues
    assert issue.path == path
    assert issue.message.startswith("expected a table, got boolean ")
    assert fix in issue.message


def test_a_json_null_is_said_once() -> None:
    from fidelity_mw import PolicyError

    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"route": [{"match": "/a", "breaker": None}]})
    assert caught.value.issues[0].message.endswith("got nothing")


# ------------------------------------------------ Fidelity(policy=...) behind another policy


@pytest.mark.parametrize("same", [True, False], ids=["same-policy", "other-policy"])
def test_a_forms_policy_the_middleware_overrides_is_said_once(
    same: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """`Fidelity(policy=Policy.from_toml(...))` next to a middleware built with another
    policy (`Policy()`): the forms counted on the middleware's memory store, silently,
    where the user had given them Redis. FidelityTransport says so; the forms did not."""
    forms_policy = Policy.from_dict({"rate_limit_headers": "on_reject"})
    fidelity = Fidelity(policy=forms_policy, clock=FakeClock())
    app = FastAPI()

    @app.get("/a", dependencies=[Depends(fidelity.limit("5/min"))])
    async def a() -> dict[str, str]:
        return {}

    middleware_policy = Policy.from_dict({"rate_limit_headers": "on_reject"}) if same else Policy()
    app.add_middleware(FidelityMiddleware, policy=middleware_policy, telemetry=False)
    with caplog.at_level("WARNING", logger="fidelity_mw"):
        assert [r.status_code for r in _get(app, ["/a", "/a"])] == [200, 200]
    said = [r.getMessage() for r in caplog.records if "Fidelity(policy=...)" in r.getMessage()]
    assert len(said) == (0 if same else 1)


# ------------------------------------------------ a background task and the answered request


def test_a_background_task_sees_the_answered_context_and_calls_on_its_own() -> None:
    """quickstart.md: a `BackgroundTasks` task still sees the request's context, marked
    `response_complete`, and its outbound calls are calls of their own, not bound by the
    answered request's deadline (which has passed here)."""
    from fidelity_mw import FidelityTransport, current

    clock = FakeClock()
    seen: list[object] = []
    sent: list[str | None] = []

    def mail_service(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("x-request-timeout-ms"))
        return httpx.Response(200)

    mail = httpx.AsyncClient(
        base_url="http://mail.internal",
        transport=FidelityTransport(httpx.MockTransport(mail_service), clock=clock),
    )

    async def send_mail() -> None:
        clock.advance(5)  # past the request's 1 s deadline
        ctx = current()
        assert ctx is not None
        seen.extend([ctx.response_complete, (ctx.remaining_s() or 0) < 0])
        response = await mail.post("/send")
        seen.append(response.extensions["fidelity_context"] is not ctx)

    app = FastAPI()

    @app.post("/signup")
    async def signup(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(send_mail)
        return {}

    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=clock, telemetry=False)

    async def run() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            headers = {"x-request-timeout-ms": "1000"}
            return (await client.post("/signup", headers=headers)).status_code

    assert asyncio.run(run()) == 200
    assert seen == [True, True, True]
    assert len(sent) == 1  # sent, not refused on the passed deadline


# ------------------------------------------------ the route class alone: a 422 is no failure


def test_the_route_class_alone_does_not_count_a_validation_error_as_a_failure() -> None:
    """Without the middleware, the route class reported FastAPI's RequestValidationError
    (the client's malformed request, answered 422) as a failure of the route: three
    requests with a bad path parameter opened the breaker, and a valid request was shed
    with 503. Behind the middleware a 422 never counted."""
    from fastapi import APIRouter

    policy = Policy.from_dict({"breaker": {"min_calls": 3, "failure_ratio": 0.5}})
    fidelity = Fidelity(policy=policy, clock=FakeClock())
    router = APIRouter(route_class=fidelity.route_class)

    @router.get("/items/{n}")
    async def item(n: int) -> dict[str, int]:
        return {"n": n}

    app = FastAPI()
    app.include_router(router)
    fidelity.install(app)
    answers = _get(app, ["/items/abc"] * 4 + ["/items/1"])
    assert [r.status_code for r in answers] == [422, 422, 422, 422, 200]


# ------------------------------------------------ one on_reject hook for every rejection


@pytest.mark.parametrize("middleware_first", [True, False], ids=["before", "after"])
def test_the_middlewares_on_reject_shapes_the_forms_rejections_too(middleware_first: bool) -> None:
    """fastapi.md, "`on_reject`: one hook for every rejection": given to the middleware
    alone, it shaped the middleware's 429s while a form's 429 on the same app came as RFC
    9457, two bodies for one kind of refusal. A `Fidelity` without a hook of its own now
    takes the middleware's."""
    from fastapi.responses import JSONResponse

    def on_reject(ctx: Any, decision: Any) -> JSONResponse:
        return JSONResponse({"error": "quota", "limit": decision.subject}, status_code=429)

    clock = FakeClock()
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/a", dependencies=[Depends(fidelity.limit("1/min", name="form"))])
    async def a() -> dict[str, str]:
        return {}

    policy = Policy.from_dict({"rate_limit": [{"name": "policy", "match": "/b", "rate": "1/min"}]})

    @app.get("/b")
    async def b() -> dict[str, str]:
        return {}

    def add() -> None:
        app.add_middleware(
            FidelityMiddleware, policy=policy, on_reject=on_reject, clock=clock, telemetry=False
        )

    if middleware_first:
        add()
        fidelity.install(app)
    else:
        fidelity.install(app)
        add()
    answers = _get(app, ["/a", "/a", "/b", "/b"])
    assert [r.status_code for r in answers] == [200, 429, 200, 429]
    assert answers[1].json() == {"error": "quota", "limit": "form"}
    assert answers[3].json() == {"error": "quota", "limit": "policy"}
    assert answers[1].headers["retry-after"] == "60"  # kept around the hook's response


def test_a_forms_own_on_reject_is_kept() -> None:
    from fastapi.responses import PlainTextResponse

    fidelity = Fidelity(on_reject=lambda ctx, decision: PlainTextResponse("own", 429))
    app = FastAPI()

    @app.get("/a", dependencies=[Depends(fidelity.limit("1/min"))])
    async def a() -> dict[str, str]:
        return {}

    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(),
        on_reject=lambda ctx, decision: PlainTextResponse("middleware's", 429),
        telemetry=False,
    )
    fidelity.install(app)
    assert _get(app, ["/a", "/a"])[1].text == "own"


@pytest.mark.parametrize("command", ["check", "map", "audit"])
def test_every_commands_help_says_its_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check --help` said them; `map` and `audit` (CI gates too) did not."""
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit " in text
    assert "2 on usage errors" in text


def test_a_forms_policy_with_rate_limits_and_no_middleware_says_they_do_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`Fidelity(policy=Policy.from_toml("fidelity.toml"))` and no middleware: the file's
    [[rate_limit]] tables limited nothing, silently (docs/fastapi.md: they are the
    middleware's job)."""
    from fastapi import APIRouter

    policy = Policy.from_dict({"rate_limit": [{"name": "tight", "rate": "1/min"}]})
    fidelity = Fidelity(policy=policy, clock=FakeClock())
    router = APIRouter(route_class=fidelity.route_class)

    @router.get("/a")
    async def a() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(router)
    with caplog.at_level("WARNING", logger="fidelity_mw"):
        assert [r.status_code for r in _get(app, ["/a", "/a", "/a"])] == [200, 200, 200]
    said = [r.getMessage() for r in caplog.records if "[[rate_limit]]" in r.getMessage()]
    assert len(said) == 1
    assert "apply only behind the middleware" in said[0]


def test_check_warns_about_a_retry_credit_on_a_limit_that_refunds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """policy.md: `retry_credit_s` has "no effect with charge = "always"" - which validated
    without a word, a setting that cannot be meant."""
    path = tmp_path / "fidelity.toml"
    path.write_text(
        '[[rate_limit]]\nname = "login"\nrate = "5/min"\ncharge = "always"\nretry_credit_s = 30\n'
        '\n[[rate_limit]]\nname = "off"\nrate = "5/min"\ncharge = "always"\nretry_credit_s = 0\n'
        '\n[[rate_limit]]\nname = "api"\nrate = "5/min"\nretry_credit_s = 30\n'
    )
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}:5: warning: rate_limit[0].retry_credit_s: has no effect" in out
    assert "rate_limit[1]" not in out
    assert "rate_limit[2]" not in out


# ------------------------------------------------ one name, one counter, one rate


def test_a_form_limit_named_like_a_policy_limit_of_another_rate_counts_on_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """migration.md has a policy `[[rate_limit]] name = "default"` (100/min) and suggests
    `Depends(fidelity.limit("3/min", name="default"))`: both counted on the key
    "default|<client>" with two rates, and the client's very first request was refused
    (GCRA's state written at 100/min is already past a 3/min limit's burst of 3)."""
    clock = FakeClock()
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/orders", dependencies=[Depends(fidelity.limit("3/min", name="default"))])
    async def orders() -> dict[str, str]:
        return {}

    policy = Policy.from_dict({"rate_limit": [{"name": "default", "rate": "100/min"}]})
    app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, telemetry=False)
    fidelity.install(app)
    with caplog.at_level("ERROR", logger="fidelity_mw"):
        answers = _get(app, ["/orders"] * 4)
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert '"default";r=97;' in answers[2].headers["ratelimit"]  # the policy's, untouched
    said = [r.getMessage() for r in caplog.records if "count at different rates" in r.getMessage()]
    assert len(said) == 1


def test_a_form_limit_named_like_a_policy_limit_of_the_same_rate_shares_its_counter() -> None:
    clock = FakeClock()
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/elsewhere", dependencies=[Depends(fidelity.limit("2/min", name="shared"))])
    async def elsewhere() -> dict[str, str]:
        return {}

    @app.get("/api/x")
    async def api() -> dict[str, str]:
        return {}

    policy = Policy.from_dict(
        {"rate_limit": [{"name": "shared", "match": "/api/*", "rate": "2/min"}]}
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, telemetry=False)
    fidelity.install(app)
    answers = _get(app, ["/api/x", "/elsewhere", "/api/x"])
    assert [r.status_code for r in answers] == [200, 200, 429]  # one quota of 2


def test_two_rates_on_one_form_limit_name_fail_where_they_are_defined() -> None:
    from fidelity_mw import PolicyError

    fidelity = Fidelity()
    fidelity.limit("10/min", name="reports")
    fidelity.limit("10/min", name="reports", cost=2)  # the same counter: fine
    with pytest.raises(PolicyError, match=r"already the counter of fidelity\.limit"):
        fidelity.limit("20/min", name="reports")


# ------------------------------------------------ fake_time(app=...) and a mounted app's stack


def test_fake_time_rebuilds_the_stack_of_a_mounted_app_with_its_own_middleware() -> None:
    """`fake_time(app=app)` dropped the app's built stack, not a mounted app's: a
    FidelityMiddleware on `v2` (mounted at /v2) kept the system clock and the state of
    the requests before the block, so the block's first request was refused and
    `clock.advance` refilled nothing."""
    from fidelity_mw.testing import fake_time

    v2 = FastAPI()

    @v2.get("/x")
    async def x() -> dict[str, str]:
        return {}

    policy = Policy.from_dict({"rate_limit": [{"name": "a", "rate": "1/min"}]})
    v2.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)
    app = FastAPI()
    app.mount("/v2", v2)
    assert _get(app, ["/v2/x"])[0].status_code == 200  # builds v2's stack, spends the unit
    with fake_time(app=app) as clock:
        first, refused = _get(app, ["/v2/x", "/v2/x"])
        clock.advance(60)
        refilled = _get(app, ["/v2/x"])[0]
    assert [first.status_code, refused.status_code, refilled.status_code] == [200, 429, 200]


def test_map_says_where_a_form_limit_named_like_a_policy_limit_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fidelity_mw.tools.statemap import from_app

    (tmp_path / "mapped_namesakes32.py").write_text(
        "from fastapi import Depends, FastAPI\n"
        "from fidelity_mw import FidelityMiddleware, Policy\n"
        "from fidelity_mw.fastapi import Fidelity\n"
        "fidelity = Fidelity()\n"
        "app = FastAPI()\n"
        "@app.get('/a', dependencies=[Depends(fidelity.limit('3/min', name='default'))])\n"
        "async def a():\n"
        "    return {}\n"
        "@app.get('/b', dependencies=[Depends(fidelity.limit('100/minute', name='api'))])\n"
        "async def b():\n"
        "    return {}\n"
        "policy = Policy.from_dict({'rate_limit': [\n"
        "    {'name': 'default', 'rate': '100/min'}, {'name': 'api', 'rate': '100/min'}]})\n"
        "app.add_middleware(FidelityMiddleware, policy=policy)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    smap = from_app("mapped_namesakes32:app")
    forms = {r.subject.split(":")[0]: r for r in smap.layers if r.config.startswith("fidelity.")}
    own = forms["route GET /a"]
    assert own.key == "default@form|{client}"
    assert "counts at 100/min, so this one keeps its own" in own.data
    shared = forms["route GET /b"]
    assert shared.key == "api|{client}"  # 100/minute is 100/min: one counter
    assert "shared with the policy's [[rate_limit]]" in shared.data


# ------------------------------------------------ check: BOM and CRLF files, empty files


@pytest.mark.parametrize(
    ("bom", "newline"),
    [(False, "\r\n"), (True, "\r\n"), (True, "\n")],
    ids=["crlf", "bom-crlf", "bom"],
)
def test_check_names_file_line_and_key_in_a_file_saved_on_windows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bom: bool, newline: str
) -> None:
    lines = [
        "version = 1",
        "",
        "[[rate_limit]]",
        'name = "per-client"',
        'rate = "5/s"',
        "burts = 3",
        "",
        "[[upstream]]",
        'host = "payments.internal"',
        "retry = { attempts = 30 }",
    ]
    path = tmp_path / "fidelity.toml"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode())
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:6: rate_limit[0].burts: unknown key; did you mean 'burst'?" in out
    assert f"{path}:10: upstream[0].retry.attempts: 30 is out of range" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here yet\n", "\ufeff"])
def test_check_takes_an_empty_policy_as_every_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = tmp_path / "fidelity.toml"
    path.write_text(text, encoding="utf-8")
    assert main(["check", str(path)]) == 0
    assert f"ok, policy version {Policy().version}" in capsys.readouterr().out


# ------------------------------------------------ OpenAPI: the policy's limits document 429


def test_install_documents_the_429_of_the_middlewares_own_limits() -> None:
    """fastapi.md recommends a `[[rate_limit]]` matching the route over the dependency
    (cheaper), yet only the dependency's 429 reached the OpenAPI schema: a client
    generated from it knew nothing of the policy's refusals."""
    policy = Policy.from_dict(
        {
            "rate_limit": [
                {"name": "writes", "match": "/api/*", "methods": ["POST"], "rate": "5/s"},
                {"name": "v2", "match": "/v2/*", "exclude": ["/v2/open"], "rate": "5/s"},
                {"name": "trial", "match": "/health", "rate": "5/s", "shadow": True},
            ]
        }
    )
    fidelity = Fidelity()
    v2 = FastAPI()

    @v2.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {}

    @v2.get("/open")
    async def open_() -> dict[str, str]:
        return {}

    app = FastAPI()

    @app.post("/api/items/{item_id}")
    async def write(item_id: str) -> dict[str, str]:
        return {}

    @app.get("/api/items/{item_id}")
    async def read(item_id: str) -> dict[str, str]:
        return {}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    app.mount("/v2", v2)
    fidelity.install(app)
    app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)  # after install
    schema, v2_schema = (r.json() for r in _get(app, ["/openapi.json", "/v2/openapi.json"]))

    def statuses(doc: dict[str, Any], path: str, method: str) -> set[str]:
        return set(doc["paths"][path][method]["responses"]) - {"200", "422"}

    assert statuses(schema, "/api/items/{item_id}", "post") == {"429"}
    assert statuses(schema, "/api/items/{item_id}", "get") == set()  # POST only
    assert statuses(schema, "/health", "get") == set()  # a shadow limit never refuses
    assert statuses(v2_schema, "/things/{thing_id}", "get") == {"429"}  # /v2/things/x
    assert statuses(v2_schema, "/open", "get") == set()  # excluded
    entry = schema["paths"]["/api/items/{item_id}"]["post"]["responses"]["429"]
    assert "Retry-After" in entry["headers"]
