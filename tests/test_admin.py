"""The live state page (`fidelity_mw.admin`): its JSON from each store, access control,
and the HTML page rendered by a real headless Chromium against a uvicorn server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from fidelity_mw import (
    BreakerConfig,
    Engine,
    FidelityMiddleware,
    Policy,
    RateLimit,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.admin import AdminApp
from fidelity_mw.decide.breaker import FAILURE, OPEN, SUCCESS
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-admin-token-0123"
POLICY = Policy(
    breaker=BreakerConfig(min_calls=2, open_jitter=0.0, open_s=30.0, open_min_s=30.0),
    rate_limits=(RateLimit(name="per-client", rate="10/min", burst=10, match="/ok"),),
    upstreams=(UpstreamConfig(host="payments.internal", retry=RetryConfig(budget_ratio=0.5)),),
)


def service(engine: Engine, admin: AdminApp | None = None) -> Starlette:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def broken(request: Request) -> Response:
        return PlainTextResponse("down", status_code=500)

    routes = [Route("/ok", ok), Route("/broken", broken)]
    if admin is not None:
        routes.append(Mount("/_fidelity", app=admin))
    app = Starlette(routes=routes)
    app.add_middleware(FidelityMiddleware, engine=engine, telemetry=False)
    return app


def engine_with(clock: Any) -> Engine:
    return Engine(POLICY, clock=clock, rng=seeded_random(7))


async def traffic(app: Starlette, client_ip: str = "127.0.0.1") -> None:
    transport = httpx.ASGITransport(app=app, client=(client_ip, 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for _ in range(3):
            await c.get("/ok")
        for _ in range(3):
            await c.get("/broken")  # min_calls=2: open after two failures, then shed


async def get(app: Any, path: str, client_ip: str = "127.0.0.1", **kw: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client_ip, 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.get(path, **kw)


# ---------------------------------------------------------------- the JSON


async def test_state_json_shows_breakers_keys_budgets_with_source_and_age(
    clock: FakeClock,
) -> None:
    engine = engine_with(clock)
    store = engine.store
    assert isinstance(store, MemoryStore)
    app = service(engine, AdminApp(engine))
    await traffic(app, client_ip="203.0.113.9")
    store.budget_request_now(
        "budget:payments.internal", POLICY.upstreams[0].retry, clock.monotonic()
    )
    clock.advance(2.0)
    response = await get(app, "/_fidelity/state.json")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    state = response.json()
    assert state["store"]["kind"] == "memory"
    assert state["policy_version"] == POLICY.version
    breakers = {b["key"]: b for b in state["breakers"]}
    broken = breakers["route:/broken"]
    assert (broken["state"], broken["calls"], broken["failures"]) == ("open", 2, 2)
    assert broken["since_s"] == pytest.approx(2.0)
    assert broken["since_basis"] == "store"
    assert broken["retry_after_s"] == pytest.approx(28.0)
    assert (broken["source"], broken["age_s"]) == ("memory", 0.0)
    ok = breakers["route:/ok"]
    assert (ok["state"], ok["calls"], ok["failures"], ok["since_basis"]) == (
        "closed",
        3,
        0,
        "start",
    )
    [key] = state["limiter_keys"]
    assert key["limit"] == "per-client"
    assert key["used"] == pytest.approx(3 - 2 / 6, abs=0.01)  # 3 units, refilling 1 per 6 s
    assert key["burst"] == 10
    assert len(key["key_hash"]) == 16
    assert "203.0.113.9" not in response.text  # client keys are hashed, never raw
    assert state["budgets"] == [
        {
            "key": "budget:payments.internal",
            "requests": 1,
            "retries": 0,
            "allowance": pytest.approx(0.5 + 3.0 * 10.0),
            "source": "memory",
            "age_s": 0.0,
        }
    ]
    assert state["instances"] == []


async def test_since_is_observed_when_the_store_cannot_say(clock: FakeClock) -> None:
    engine = engine_with(clock)
    store = engine.store
    assert isinstance(store, MemoryStore)
    admin = AdminApp(engine)
    breaker = POLICY.breaker
    assert breaker is not None
    store.breaker_state("route:/x", breaker).force("half_open", clock.monotonic(), seeded_random())
    first = (await admin.state(engine))["breakers"][0]
    clock.advance(4.0)
    later = (await admin.state(engine))["breakers"][0]
    assert (first["state"], first["since_basis"], first["since_s"]) == (
        "half_open",
        "observed",
        0.0,
    )
    assert later["since_s"] == pytest.approx(4.0)


async def test_page_without_engine_uses_the_middlewares(clock: FakeClock) -> None:
    engine = engine_with(clock)
    app = service(engine, AdminApp())
    await traffic(app)
    state = (await get(app, "/_fidelity/state.json")).json()
    assert {b["key"] for b in state["breakers"]} >= {"route:/ok", "route:/broken"}
    alone = await get(AdminApp(), "/state.json")
    assert alone.status_code == 503
    assert alone.json()["type"] == "urn:fidelity-mw:problem:admin-no-engine"


async def test_html_page_points_at_its_json_under_the_mount(clock: FakeClock) -> None:
    engine = engine_with(clock)
    page = await get(service(engine, AdminApp(engine, refresh_s=0.5)), "/_fidelity/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'const STATE_URL = "/_fidelity/state.json" + window.location.search;' in page.text
    assert "const REFRESH_MS = 500;" in page.text
    missing = await get(service(engine, AdminApp(engine)), "/_fidelity/nope")
    assert missing.status_code == 404


# ---------------------------------------------------------------- access


async def test_refuses_non_loopback_clients_without_a_token(clock: FakeClock) -> None:
    admin = AdminApp(engine_with(clock))
    assert (await get(admin, "/state.json", client_ip="127.0.0.1")).status_code == 200
    assert (await get(admin, "/state.json", client_ip="::1")).status_code == 200
    refused = await get(admin, "/state.json", client_ip="10.1.2.3")
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert "breakers" not in refused.text
    # a proxy-supplied address is not trusted: only the peer counts
    spoofed = await get(
        admin, "/state.json", client_ip="10.1.2.3", headers={"x-forwarded-for": "127.0.0.1"}
    )
    assert spoofed.status_code == 403


async def test_a_forwarded_request_is_not_a_loopback_one(clock: FakeClock) -> None:
    """ops8 walkthrough: uvicorn with --forwarded-allow-ips '*' (usual behind a load
    balancer) rewrites scope["client"] from X-Forwarded-For before the app sees it, so
    any client sending `X-Forwarded-For: 127.0.0.1` got the token-less page (200 from
    192.0.2.2 in the run). A request carrying a proxy's header came from elsewhere."""
    admin = AdminApp(engine_with(clock))
    for name, value in (
        ("x-forwarded-for", "127.0.0.1"),
        ("forwarded", "for=127.0.0.1"),
        ("x-real-ip", "127.0.0.1"),
    ):
        refused = await get(admin, "/state.json", client_ip="127.0.0.1", headers={name: value})
        assert refused.status_code == 403, name
    # with a token, forwarded requests are served as before
    admin = AdminApp(engine_with(clock), token=TOKEN)
    headers = {"authorization": f"Bearer {TOKEN}", "x-forwarded-for": "10.1.2.3"}
    assert (await get(admin, "/state.json", headers=headers)).status_code == 200


async def test_token_is_required_from_every_client_once_set(clock: FakeClock) -> None:
    admin = AdminApp(engine_with(clock), token=TOKEN)
    assert (await get(admin, "/state.json")).status_code == 401  # even from loopback
    bearer = {"authorization": f"Bearer {TOKEN}"}
    assert (
        await get(admin, "/state.json", client_ip="10.1.2.3", headers=bearer)
    ).status_code == 200
    assert (await get(admin, f"/state.json?token={TOKEN}", client_ip="10.1.2.3")).status_code == 200
    wrong = {"authorization": f"Bearer {TOKEN[:-1]}x"}
    assert (await get(admin, "/state.json", headers=wrong)).status_code == 401
    assert (await get(admin, "/state.json?token=")).status_code == 401
    with pytest.raises(ValueError, match="16 characters"):
        AdminApp(token="short")


async def test_a_query_token_is_read_as_utf8_and_junk_is_refused(clock: FakeClock) -> None:
    """A percent-escape outside latin-1, or a byte that is no UTF-8, is a wrong token (401),
    not a 500 of the page's own; a non-ASCII token works in the query as in the header."""
    admin = AdminApp(engine_with(clock), token=TOKEN)
    for junk in ("%E2%82%AC", "%FF", "%C3%A9"):
        assert (await get(admin, f"/state.json?token={junk}")).status_code == 401
    accented = "jeton-d-admin-été-0123"
    admin = AdminApp(engine_with(clock), token=accented)
    assert (await get(admin, f"/state.json?token={quote(accented)}")).status_code == 200
    bearer = {"authorization": f"Bearer {accented}".encode()}
    assert (await get(admin, "/state.json", headers=bearer)).status_code == 200


async def test_an_ipv4_mapped_loopback_peer_is_loopback(clock: FakeClock) -> None:
    """A dual-stack server reports IPv4 peers as ::ffff:a.b.c.d."""
    admin = AdminApp(engine_with(clock))
    assert (await get(admin, "/state.json", client_ip="::ffff:127.0.0.1")).status_code == 200
    refused = await get(admin, "/state.json", client_ip="::ffff:10.1.2.3")
    assert refused.status_code == 403


async def test_read_only(clock: FakeClock) -> None:
    transport = httpx.ASGITransport(app=AdminApp(engine_with(clock)))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.post("/state.json")).status_code == 405


async def test_snapshot_changes_no_decision(clock: FakeClock) -> None:
    store = MemoryStore(rng=seeded_random(1))
    spec = LimitSpec("l", 1.0, 2.0, 1, False)
    now = clock.monotonic()
    store.admit_now(None, None, ["l|a"], [spec], now)
    before = dict(store.limits.tats)
    snap = await store.snapshot(now + 0.5, top=5)
    assert store.limits.tats == before
    assert [(k.key, k.backlog_s) for k in snap.limiter_keys] == [("l|a", 0.5)]
    assert snap.limiter_key_count == 1


# ---------------------------------------------------------------- Redis and tiered


@pytest.mark.redis
async def test_redis_snapshot_reads_the_fleet_state(redis_url: str) -> None:
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.state.snapshot import SnapshotConfigs

    prefix = f"admin{os.getpid()}"
    store = RedisStore(config=StateConfig(url=redis_url, key_prefix=prefix), rng=seeded_random(3))
    breaker = BreakerConfig(min_calls=2, open_jitter=0.0, open_s=30.0, open_min_s=30.0)
    spec = LimitSpec("per-client", 1.0, 5.0, 1, False)
    retry = RetryConfig()
    try:
        for _ in range(2):
            result = await store.admit("route:/r", breaker, ["per-client|k1"], [spec], 0.0)
            assert result.gate is not None
            await store.record("route:/r", breaker, result.gate, FAILURE, False, 0.0)
        await store.outbound_gate(None, None, "budget:up", retry, False, 0.0)
        snap = await store.snapshot(
            0.0,
            top=5,
            configs=SnapshotConfigs(breaker=lambda key: breaker, retry=lambda key: retry),
        )
    finally:
        await store.aclose()
    assert snap.kind == "redis"
    assert snap.source == "redis"
    [view] = snap.breakers
    assert (view.key, view.state, view.source) == ("route:/r", OPEN, "redis")
    assert view.since_s is not None
    assert 0.0 <= view.since_s < 5.0
    assert 25.0 < view.retry_after_s <= 30.0
    [key] = snap.limiter_keys
    assert key.key == "per-client|k1"
    assert 0.0 < key.backlog_s <= 2.0  # two units taken, refilling 1 per second
    [budget] = snap.budgets
    assert (budget.key, budget.requests, budget.retries) == ("budget:up", 1, 0)


async def test_redis_snapshot_lists_a_breaker_that_never_tripped(redis_url: str) -> None:
    """ops8 walkthrough: a breaker hash that only ever had its window written (no
    transition, so no `st` field: the scripts read that as closed) was skipped as
    "never written", so a busy, healthy route was missing from the page."""
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.state.snapshot import SnapshotConfigs

    store = RedisStore(config=StateConfig(url=redis_url), rng=seeded_random(3))
    breaker = BreakerConfig(min_calls=20)
    try:
        for _ in range(3):
            result = await store.admit("route:/ok", breaker, [], [], 0.0)
            assert result.gate is not None
            await store.record("route:/ok", breaker, result.gate, SUCCESS, False, 0.0)
        await store.admit("route:/ok", breaker, [], [], 0.0)  # carries the successes
        snap = await store.snapshot(0.0, configs=SnapshotConfigs(breaker=lambda key: breaker))
    finally:
        await store.aclose()
    [view] = snap.breakers
    assert (view.key, view.state, view.calls, view.source) == ("route:/ok", "closed", 3, "redis")


@pytest.mark.redis
async def test_redis_snapshot_skips_a_breaker_or_budget_it_cannot_read(redis_url: str) -> None:
    """A page about the state must not fail on one odd value: a breaker hash or a budget
    ring holding what our scripts never write (a hand edit, another version's format) is
    left off the page, and the others are shown; before, the page answered 500."""
    import redis as redis_sync

    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.state.snapshot import SnapshotConfigs

    prefix = f"adminodd{os.getpid()}"
    store = RedisStore(config=StateConfig(url=redis_url, key_prefix=prefix), rng=seeded_random(3))
    breaker = BreakerConfig(min_calls=20)
    retry = RetryConfig()
    direct = redis_sync.Redis.from_url(redis_url)
    try:
        for route in ("route:/ok", "route:/odd"):
            result = await store.admit(route, breaker, [], [], 0.0)
            assert result.gate is not None
            await store.record(route, breaker, result.gate, FAILURE, False, 0.0)
        for budget in ("budget:ok", "budget:odd"):
            await store.outbound_gate(None, None, budget, retry, False, 0.0)
        await store.admit("route:/ok", breaker, [], [], 0.0)  # carries the outcomes
        await store.admit("route:/odd", breaker, [], [], 0.0)
        direct.hset(store.breaker_keys("route:/odd")[0], mapping={"st": "x", "ou": "soon"})
        direct.hset(store.key("bu", "budget:odd"), mapping={"rq": "1,two,3"})
        snap = await store.snapshot(
            0.0, configs=SnapshotConfigs(breaker=lambda key: breaker, retry=lambda key: retry)
        )
    finally:
        direct.close()
        await store.aclose()
    assert [view.key for view in snap.breakers] == ["route:/ok"]
    assert [view.key for view in snap.budgets] == ["budget:ok"]


async def test_redis_snapshot_while_redis_is_down_shows_the_fallback() -> None:
    from fidelity_mw.state.redis import RedisStore

    store = RedisStore("redis://127.0.0.1:1/0", rng=seeded_random(3))
    store.health.up = False  # as after a failed call: no request waits for Redis
    store.local.admit_now(None, None, ["l|a"], [LimitSpec("l", 1.0, 2.0, 1, False)], 0.0)
    try:
        snap = await store.snapshot(0.0)
    finally:
        store.health.up = True
        await store.aclose()
    assert snap.source == "fallback"
    assert "unreachable" in snap.notes[0]
    assert [(k.key, k.source) for k in snap.limiter_keys] == [("l|a", "fallback")]


# ---------------------------------------------------------------- the page in Chromium


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
def test_page_renders_live_state_in_headless_chromium(tmp_path: Path) -> None:
    """A real browser loads the page from uvicorn, runs its script, shows the state,
    and shows a change made after it loaded (the in-place refresh)."""
    found = _chromium()
    if found is None:
        pytest.fail(
            "chromium and chromedriver are needed: apt-get install chromium chromium-driver"
        )
    from selenium import webdriver  # the dev extra installs it
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from _loopback import LoopbackServer

    engine = Engine(POLICY, rng=seeded_random(9))
    app = service(engine, AdminApp(engine, refresh_s=0.3))
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    # the console's messages: a script or style the page's Content-Security-Policy
    # refused is reported there
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with LoopbackServer(app) as server:
        with httpx.Client(base_url=server.url) as c:
            for _ in range(4):
                c.get("/ok")
            for _ in range(3):
                c.get("/broken")
        driver = webdriver.Chrome(options=options, service=Service(found[1]))
        try:
            driver.set_page_load_timeout(30)
            driver.get(server.url + "/_fidelity/")
            wait = WebDriverWait(driver, 30, poll_frequency=0.05)
            wait.until(lambda d: d.find_element(By.ID, "updated").text.strip() != "")
            rows = _rows(driver, "breakers")
            by_subject = {row[1]: row for row in rows}
            assert by_subject["/broken"][2] == "open"
            assert by_subject["/ok"][2] == "closed"
            assert by_subject["/ok"][4] == "4"  # calls in the window
            assert by_subject["/broken"][10] == "memory"  # source
            assert driver.find_element(By.ID, "store-kind").text == "memory"
            # which process answered (one of several workers, in production)
            assert driver.find_element(By.ID, "process").text.startswith(f"pid {os.getpid()} on ")
            [key_row] = _rows(driver, "limiter-keys")
            assert key_row[0] == "per-client"
            assert "127.0.0.1" not in driver.page_source
            # a change after the page loaded shows up without reloading it
            with httpx.Client(base_url=server.url) as c:
                for _ in range(2):
                    c.get("/ok")
            wait.until(lambda d: {r[1]: r for r in _rows(d, "breakers")}["/ok"][4] == "6")
            # it ran under its policy (script and style by nonce), and nothing was refused
            assert driver.execute_script("return document.styleSheets.length") == 1
            refused = [
                entry["message"]
                for entry in driver.get_log("browser")
                if "Content Security Policy" in entry["message"]
            ]
            assert refused == []
            shot = os.environ.get("FIDELITY_MW_ADMIN_SCREENSHOT")
            if shot:
                driver.save_screenshot(shot)
            else:
                assert driver.save_screenshot(str(tmp_path / "admin.png"))
        finally:
            driver.quit()


def _rows(driver: Any, body_id: str) -> list[list[str]]:
    """The table's cells, read in one script call (the page replaces rows as it refreshes)."""
    rows: list[list[str]] = driver.execute_script(
        "return Array.from(document.getElementById(arguments[0]).rows)"
        ".map(r => Array.from(r.cells).map(c => c.textContent));",
        body_id,
    )
    return rows


def test_page_json_is_plain_data(clock: FakeClock) -> None:
    import anyio

    engine = engine_with(clock)
    state = anyio.run(AdminApp(engine).state, engine)
    assert json.loads(json.dumps(state)) == state


@pytest.mark.redis
async def test_tiered_snapshot_shows_the_cache_and_the_fleet_underneath(redis_url: str) -> None:
    from fidelity_mw.clock import SYSTEM_CLOCK
    from fidelity_mw.state.tiered import TieredStore

    # Redis's timeout is not what this shows: at the default 250 ms a loaded machine that
    # descheduled this process (or Redis) past it read the fleet as `fallback`
    config = StateConfig(
        url="tiered+" + redis_url,
        key_prefix=f"admint{os.getpid()}",
        timeout_ms=5_000,
        connect_timeout_ms=5_000,
    )
    store = TieredStore(config=config, rng=seeded_random(4))
    breaker = BreakerConfig()
    spec = LimitSpec("per-client", 0.1, 4.0, 1, False)  # 40 units, 10/s
    now = SYSTEM_CLOCK.monotonic  # the store's own clock: it drops what looks idle on it
    try:
        for _ in range(3):
            result = await store.admit("route:/t", breaker, ["per-client|k"], [spec], now())
            assert result.admitted
        snap = await store.snapshot(now())
    finally:
        await store.aclose()
    assert (snap.kind, snap.source) == ("tiered", "cache")
    [cached] = snap.breakers
    assert (cached.key, cached.state, cached.source) == ("route:/t", "closed", "cache")
    [key] = snap.limiter_keys
    assert key.key == "per-client|k"
    assert key.source == "cache"
    assert key.held is not None
    assert key.held >= 0
    [exact] = snap.layers
    assert (exact.kind, exact.source) == ("redis", "redis")
    # the fleet's bucket: the units this instance leased for its slice are gone from it
    assert [k.key for k in exact.limiter_keys] == ["per-client|k"]
    assert exact.limiter_keys[0].backlog_s > 0.0


async def test_state_json_shows_the_balancers_instances_and_hedging_window() -> None:
    """What the transports on the engine know of a service's instances (in flight, latency
    EWMA, breaker known open, ejected) and of a hedged upstream's latency window."""
    from fidelity_mw import FidelityTransport
    from fidelity_mw.policy import HedgeConfig

    clock = FakeClock()
    instances = ("http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003")
    breaker = BreakerConfig(open_s=30.0, open_min_s=30.0, open_jitter=0.0)
    policy = Policy(
        upstreams=(
            UpstreamConfig(host="payments", instances=instances, breaker=breaker),
            UpstreamConfig(host="ledger", hedge=HedgeConfig(after="p95", min_samples=3)),
        )
    )
    store = MemoryStore(rng=seeded_random(3))
    engine = Engine(policy, clock=clock, rng=seeded_random(7), store=store)

    def answer(request: httpx.Request) -> httpx.Response:
        clock.advance(0.02)  # every attempt takes 20 ms
        return httpx.Response(200)

    transport = FidelityTransport(httpx.MockTransport(answer), engine=engine, telemetry=False)
    forced_at = clock.monotonic()
    store.breaker_state("upstream:10.0.0.1:8001", breaker).force(
        OPEN, clock.monotonic(), seeded_random(0)
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(12):
            assert (await client.get("http://payments/pay")).status_code == 200
        for _ in range(2):
            await client.get("http://ledger/entries")
        admin = AdminApp(engine=engine)
        state = json.loads((await get(admin, "/state.json")).text)
        rows = {row["instance"]: row for row in state["balancer"]}
        assert set(rows) == {"10.0.0.1:8001", "10.0.0.2:8002", "10.0.0.3:8003"}
        assert {row["service"] for row in rows.values()} == {"payments"}
        opened = rows["10.0.0.1:8001"]
        assert opened["breaker_open"] is True
        assert opened["ejected"] is True
        assert opened["open_for_s"] == pytest.approx(30.0 - (clock.monotonic() - forced_at))
        assert opened["latency_ms"] is None  # never called: ejected throughout
        for key in ("10.0.0.2:8002", "10.0.0.3:8003"):
            assert rows[key]["breaker_open"] is False
            assert rows[key]["ejected"] is False
            assert rows[key]["outstanding"] == 0
            assert rows[key]["latency_ms"] == pytest.approx(20.0)
        (hedging,) = state["hedging"]
        assert hedging["upstream"] == "ledger"
        assert hedging["samples"] == 2
        assert hedging["p95_ms"] is None  # fewer than min_samples: the fixed delay applies
        assert hedging["delay_ms"] == 50.0
        await client.get("http://ledger/entries")
        state = json.loads((await get(admin, "/state.json")).text)
        (hedging,) = state["hedging"]
        assert hedging["samples"] == 3
        # min_samples reached: the delay is now the window's p95 (on the fake clock the
        # race's own 50 ms wait is inside each sample)
        assert hedging["p95_ms"] is not None
        assert hedging["p95_ms"] >= 20.0
        assert hedging["delay_ms"] == hedging["p95_ms"]
