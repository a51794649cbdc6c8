"""Defects a seventh review found.

1. A refund of a request admitted on the Redis store's local fallback (Redis away) as
   this instance's fleet share went to the bucket of whatever share was current at the
   refund: when the fleet size went stale while the request ran, the units went to the
   whole limit's bucket and the share's stayed spent.
2. `Engine.bulkhead_for` checked, then set: two threads building the route's plan at
   once each made a bulkhead, and the route's in-flight limit was split in two.
3. The admin page returned on a websocket scope without a word: the client hung.
4. The admin page's `?token=` read a "+" as a space: a base64 token pasted into the URL
   was refused (only "%2B" worked).
5. `[deadline] default_ms` above `max_ms` was accepted; every request without a header
   then had the cap's deadline, not the default the file said.
6. A policy file starting with a UTF-8 byte order mark was "not valid TOML: Invalid
   statement (at line 1, column 1)".
7. `Depends(fidelity.limit(key="header:..."))` keyed on the first line of a repeated
   header where the middleware joins every line; its 503 for a store away under
   `on_error = "closed"` was recorded as outcome "rejected", the middleware's own as "shed".
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import WebSocket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import fidelity_mw.engine as engine_module
from fidelity_mw import FidelityMiddleware, Policy, RateLimit, current
from fidelity_mw.admin import AdminApp
from fidelity_mw.context import DecisionContext
from fidelity_mw.decide.concurrency import ConcurrencyLimiter
from fidelity_mw.engine import Engine
from fidelity_mw.errors import PolicyError, StateUnavailable
from fidelity_mw.policy import ConcurrencyConfig, DeadlineConfig, StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock, seeded_random
from fidelity_mw.tools.check import check_file
from redis_server import PATIENT, refused_port

pytestmark = pytest.mark.anyio


class Recorder:
    """A RequestObserver that keeps every request's DecisionContext."""

    def __init__(self) -> None:
        self.contexts: list[DecisionContext] = []

    def start(self, ctx: DecisionContext, scope: Any) -> None:
        return None

    def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.contexts.append(ctx)


# ------------------------- 1. a fallback refund after the fleet share went stale


def _away_store(clock: FakeClock, fleet_size: int) -> RedisStore:
    """A Redis store whose server is gone, that last saw a fleet of `fleet_size`."""
    config = StateConfig(url=f"redis://127.0.0.1:{refused_port()}/0", key_prefix="r7", **PATIENT)  # type: ignore[arg-type]
    store = RedisStore(config=config, rng=seeded_random(3), clock=clock)
    store.coalesce = False
    store.fleet.size, store.fleet.seen_at = fleet_size, clock.monotonic()
    return store


async def test_a_fallback_refund_goes_back_to_the_share_it_was_charged_on() -> None:
    """Burst 8 on a fleet of 4: the share admits 2. A request on the share is answered
    503 by the outbound layer (upstream exhausted) after the fleet size went stale
    (max age 60 s): its unit goes back to the share's bucket, not to the whole limit's
    (which then would admit 8 + 1 while the share stays spent)."""
    clock = FakeClock()
    store = _away_store(clock, 4)
    limit = RateLimit(name="l", rate="1/h", burst=8, match="/x", retry_credit_s=0.0)
    policy = Policy(rate_limits=(limit,), breaker=None, deadline=DeadlineConfig(default_ms=None))

    async def x(request: Request) -> Response:
        if request.query_params.get("long"):
            clock.advance(61.0)  # the fleet size goes stale while the request runs
            ctx = current()
            assert ctx is not None
            ctx.upstream_exhausted = True  # the outbound layer gave up: served_only refund
            return PlainTextResponse("upstream away", status_code=503)
        return PlainTextResponse("ok")

    recorder = Recorder()
    app = Starlette(routes=[Route("/x", x)])
    app.add_middleware(
        FidelityMiddleware, policy=policy, store=store, clock=clock, telemetry=False,
        observer=recorder,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            first = await client.get("/x?long=1")
            assert first.status_code == 503
            share = recorder.contexts[0].decisions[-1]
            assert (share.layer, share.state_source) == ("ratelimit", "fallback")
            assert share.details is not None
            assert share.details.get("fleet_size") == 4
            # the share is trusted again (a fresh size, read as Redis blinked): its bucket
            # holds 2, none of which the first request kept
            store.fleet.seen_at = clock.monotonic()
            shares = [(await client.get("/x")).status_code for _ in range(3)]
            # and the whole limit's bucket was never charged, so gets nothing back
            store.fleet.seen_at = clock.monotonic() - 61.0
            whole = [(await client.get("/x")).status_code for _ in range(9)]
    finally:
        await store.aclose()
    assert shares == [200, 200, 429]
    assert whole == [200] * 8 + [429]


# ------------------------------------------ 2. two threads, one route, one bulkhead


def test_two_threads_building_a_routes_plan_share_one_bulkhead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other thread's plan is built while this one's bulkhead is being made (the
    interleaving forced by building it from inside the constructor): both get the
    same limiter, and it is the one the engine keeps."""
    engine = Engine(Policy(concurrency=ConcurrencyConfig(limit=4)), clock=FakeClock())
    cfg = engine.policy.concurrency
    assert cfg is not None
    other: list[ConcurrencyLimiter] = []
    real = engine_module.ConcurrencyLimiter

    def interleaved(*args: Any, **kwargs: Any) -> ConcurrencyLimiter:
        limiter = real(*args, **kwargs)
        if not other:
            other.append(limiter)  # (keeps the recursion to one level)
            worker = threading.Thread(target=lambda: other.append(engine.bulkhead_for("/r", cfg)))
            worker.start()
            worker.join()
        return limiter

    monkeypatch.setattr(engine_module, "ConcurrencyLimiter", interleaved)
    mine = engine.bulkhead_for("/r", cfg)
    theirs = other[1]
    assert mine is theirs
    assert engine.bulkheads["/r"] is mine
    assert engine.bulkhead_for("/r", cfg) is mine  # and later, the same one


# ----------------------------------------------------- 3. a websocket on the admin page


async def test_the_admin_page_refuses_a_websocket_instead_of_leaving_it_hanging() -> None:
    admin = AdminApp(Engine(Policy(), clock=FakeClock()))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/", "headers": [], "client": ("127.0.0.1", 1)}
    await admin(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.close"]  # before an accept: a 403


# ------------------------------------------------------- 4. a "+" in the admin token


TOKEN = "ab+cd/ef+gh==0123456"  # base64 holds "+" and "/"


async def _status(admin: AdminApp, query: bytes) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/state.json",
        "root_path": "",
        "query_string": query,
        "headers": [],
        "client": ("10.0.0.1", 1),
    }
    await admin(scope, receive, send)
    status: int = sent[0]["status"]
    return status


@pytest.mark.parametrize(
    ("query", "status"),
    [
        (b"token=ab+cd/ef+gh==0123456", 200),  # pasted as is
        (b"token=ab%2Bcd%2Fef%2Bgh%3D%3D0123456", 200),  # percent-encoded
        (b"x=1&token=ab%2bcd/ef+gh%3d%3d0123456", 200),  # mixed, lowercase escapes
        (b"token=ab cd/ef gh==0123456", 401),  # spaces are not pluses
        (b"token=ab%20cd/ef%20gh==0123456", 401),
        (b"token=ab+cd", 401),
    ],
)
async def test_a_plus_in_the_query_token_is_the_tokens_own_plus(query: bytes, status: int) -> None:
    admin = AdminApp(Engine(Policy(), clock=FakeClock()), token=TOKEN)
    assert await _status(admin, query) == status


async def test_a_token_with_a_space_may_be_sent_form_encoded() -> None:
    admin = AdminApp(Engine(Policy(), clock=FakeClock()), token="a token with spaces")
    assert await _status(admin, b"token=a+token+with+spaces") == 200
    assert await _status(admin, b"token=a%20token%20with%20spaces") == 200
    assert await _status(admin, b"token=a+token+with+space") == 401


# ----------------------------------------------------- 5. a default above the cap


def test_a_default_deadline_above_the_cap_is_an_error_naming_the_field() -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"deadline": {"default_ms": 30_000, "max_ms": 5_000}})
    assert [issue.path for issue in caught.value.issues] == ["deadline.default_ms"]
    assert "exceeds max_ms 5000" in caught.value.issues[0].message
    # equal, below, or either one unset: fine
    for table in ({"default_ms": 5_000, "max_ms": 5_000}, {"default_ms": 1, "max_ms": 5_000},
                  {"default_ms": False, "max_ms": 5_000}, {"default_ms": 90_000}):  # fmt: skip
        Policy.from_dict({"deadline": table})
    # a bad value is its own field's problem only
    with pytest.raises(PolicyError) as caught:
        DeadlineConfig(default_ms=30_000, max_ms=0)
    assert [issue.path for issue in caught.value.issues] == ["max_ms"]


# ---------------------------------------------------- 6. a byte order mark in the file


def test_a_policy_file_with_a_byte_order_mark_loads_and_checks(tmp_path: Path) -> None:
    path = tmp_path / "fidelity.toml"
    text = 'version = 1\n\n[[rate_limit]]\nname = "api"\nrate = "5/s"\nburst = "x"\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.replace('burst = "x"\n', "").encode())
    policy = Policy.from_toml(path)
    assert policy.rate_limits[0].name == "api"
    assert check_file(path).ok
    # the check's line numbers still count from the file's first line
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = check_file(path)
    assert [(f.line, f.path) for f in result.errors] == [(6, "rate_limit[0].burst")]


# ------------------------------------------- 7. the limit dependency, as the middleware


async def test_the_limit_dependency_keys_a_repeated_header_as_the_middleware() -> None:
    """Two lines of X-Api-Key are one key for the dependency and the middleware alike.
    (Review 9: that key is the first line, the value the app reads; keyed on both lines
    joined, a junk second line was a fresh counter per request:
    test_defects_review9_inbound.py.)"""
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()
    store = MemoryStore(rng=seeded_random(4))
    app = FastAPI()

    @app.get("/k", dependencies=[Depends(fidelity.limit("1/h", key="header:x-api-key"))])
    async def k() -> dict[str, int]:
        return {"ok": 1}

    limit = RateLimit(name="mw", rate="100/h", key="header:x-api-key", match="/k")
    policy = Policy(rate_limits=(limit,), breaker=None)
    app.add_middleware(
        FidelityMiddleware, policy=policy, store=store, clock=FakeClock(), telemetry=False
    )
    fidelity.install(app)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        first = await client.get("/k", headers=[("x-api-key", "a"), ("x-api-key", "b")])
        again = await client.get("/k", headers=[("x-api-key", "a"), ("x-api-key", "b")])
    assert (first.status_code, again.status_code) == (200, 429)
    keys = {key.split("|", 1)[1] for key in store.limits.tats}
    assert keys == {"h:a"}  # the dependency's and the middleware's: the same key


class _Unreachable(MemoryStore):
    admit_now = None  # (the middleware's own limits ask this one first)

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        raise StateUnavailable("redis is unreachable and state.on_error is 'closed'")


async def test_a_dependencys_closed_on_error_503_is_shed_like_the_middlewares() -> None:
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    policy = Policy(breaker=None, state=StateConfig(on_error="closed"))
    recorders = []
    responses = []
    for own in (False, True):  # the dependency's limit, then the middleware's own
        fidelity = Fidelity()
        app = FastAPI()
        dependencies = [] if own else [Depends(fidelity.limit("5/min"))]

        @app.get("/x", dependencies=dependencies)
        async def x() -> dict[str, int]:
            return {"ok": 1}

        recorder = Recorder()
        mw_policy = (
            Policy(
                breaker=None,
                state=StateConfig(on_error="closed"),
                rate_limits=(RateLimit(name="mw", rate="5/min"),),
            )
            if own
            else policy
        )
        app.add_middleware(
            FidelityMiddleware, policy=mw_policy, store=_Unreachable(), clock=FakeClock(),
            telemetry=False, observer=recorder,
        )  # fmt: skip
        fidelity.install(app)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            responses.append(await client.get("/x"))
        recorders.append(recorder)
    assert [r.status_code for r in responses] == [503, 503]
    assert [r.json()["type"] for r in responses] == [
        "urn:fidelity-mw:problem:state-unavailable"
    ] * 2
    dependency, middleware = (rec.contexts[0] for rec in recorders)
    # decided by the state's absence, not by a limit (review 16)
    assert (middleware.decided_by, middleware.outcome) == ("state", "shed")
    assert (dependency.decided_by, dependency.outcome) == ("state", "shed")


# ------------------------------- part 2: one bad operation in a coalesced tick


def _spec(burst: int) -> Any:
    from fidelity_mw.state.base import LimitSpec

    return LimitSpec("l", 60.0, 60.0 * burst, 1, False)  # no refill within a test


@pytest.mark.redis
@pytest.mark.parametrize("on_error", ["local", "closed"])
async def test_one_operation_failing_in_a_batch_fails_that_request_alone(
    redis_url: str, redis_server: Any, on_error: str
) -> None:
    """Six admissions of one tick share a call; the third one's key holds a value that
    is not ours (WRONGTYPE). Alone, that request would fall back (or be refused under
    "closed") and the others be decided by Redis: so in a batch too. Before, the
    script's error failed the whole call: every request of the tick fell back (or got
    503), and the two decided before the error stayed charged in Redis as well."""
    config = StateConfig(url=redis_url, on_error=on_error, **PATIENT, fleet_share_max_age_s=0.0)  # type: ignore[arg-type]
    store = RedisStore(config=config, rng=seeded_random(3))
    limit = _spec(2)
    keys = [f"l|c{i}" for i in range(6)]
    with redis_server.client() as client:
        client.hset(store.key("rl", keys[2]), "foreign", "1")
    try:
        got = await asyncio.gather(
            *(store.admit(None, None, [key], [limit], 0.0) for key in keys),
            return_exceptions=True,
        )
        assert store.coalescer.batches == 1
        # each healthy key was charged once, in Redis: one unit of two left
        again = await asyncio.gather(
            *(store.admit(None, None, [k], [limit], 0.0) for k in keys[:2])
        )
    finally:
        await store.aclose()
    sources = [r.source if not isinstance(r, BaseException) else type(r).__name__ for r in got]
    failed = "StateUnavailable" if on_error == "closed" else "fallback"
    assert sources == ["redis", "redis", failed, "redis", "redis", "redis"]
    assert [(r.source, r.admitted, r.limits[0].remaining) for r in again] == [
        ("redis", True, 0)
    ] * 2


@pytest.mark.redis
async def test_a_request_cancelled_before_its_ticks_call_is_not_sent(redis_url: str) -> None:
    """Three admissions of one tick; the second request is cancelled before the call goes
    out (its client left): the others get their answers, and its key is not charged."""
    config = StateConfig(url=redis_url, **PATIENT, fleet_share_max_age_s=0.0)  # type: ignore[arg-type]
    store = RedisStore(config=config, rng=seeded_random(3))
    limit = _spec(1)
    try:
        tasks = [
            asyncio.ensure_future(store.admit(None, None, [f"l|q{i}"], [limit], 0.0))
            for i in range(3)
        ]
        await asyncio.sleep(0)  # each has queued its operation
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        assert [(r.source, r.admitted) for r in (done[0], done[2])] == [("redis", True)] * 2
        # the cancelled request's unit is still there
        later = await store.admit(None, None, ["l|q1"], [limit], 0.0)
        assert (later.source, later.admitted) == ("redis", True)
    finally:
        await store.aclose()


# ------------------------------------------------- part 2: `fidelity-mw map` arguments


@pytest.mark.parametrize(
    ("source", "target", "said"),
    [
        ("app = 42\n", "notapp:app", "is int 42, not an ASGI app"),
        ("import os\napp = os\n", "notapp:app", "is module <module 'os'"),
        ("app = 'x'\n", "notapp", "neither a policy file nor an app import path"),
    ],
)
def test_map_of_something_that_is_no_app_is_a_usage_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
    target: str,
    said: str,
) -> None:
    """Before, `fidelity-mw map mod:app` with `app = 42` printed a map of "builtins.int"
    and exited 0."""
    from fidelity_mw.tools.cli import EXIT_USAGE, main

    (tmp_path / "notapp.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "notapp", raising=False)
    assert main(["map", target]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert said in err
    assert "Traceback" not in err


def test_map_of_a_directory_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fidelity_mw.tools.cli import EXIT_USAGE, main

    (tmp_path / "policies.toml").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["map", "policies.toml"]) == EXIT_USAGE
    assert "policies.toml: is a directory, not a policy file" in capsys.readouterr().err


# ------------------------------ part 2: `Depends(fidelity.limit)` on a websocket route


def test_a_limit_dependency_on_a_websocket_route_limits_its_handshakes() -> None:
    """Before, FastAPI could not fill the dependency's `Request` parameter on a websocket
    route: every handshake failed with a TypeError. Now the handshake is limited like a
    GET (the middleware lets websockets by undecided, so the form decides on its own):
    over the limit, the handshake is denied with the problem's 429."""
    import warnings

    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx works
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient, WebSocketDenialResponse

    fidelity = Fidelity(clock=FakeClock())
    app = FastAPI()
    keys: list[str] = []

    @app.websocket("/ws", dependencies=[Depends(fidelity.limit("1/h", key="header:x-k"))])
    async def ws(websocket: WebSocket) -> None:
        keys.append(websocket.state.fidelity.route)  # the form's own decision context
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=FakeClock(), telemetry=False)
    fidelity.install(app)
    with TestClient(app) as client:
        with client.websocket_connect("/ws", headers={"x-k": "a"}) as socket:
            assert socket.receive_text() == "hi"
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/ws", headers={"x-k": "a"}).__enter__()
        with client.websocket_connect("/ws", headers={"x-k": "b"}) as socket:  # its own key
            assert socket.receive_text() == "hi"
    assert denied.value.status_code == 429
    assert denied.value.json()["type"] == "urn:fidelity-mw:problem:rate-limited"
    assert denied.value.headers["retry-after"] == "3600"
    assert keys == ["/ws", "/ws"]
