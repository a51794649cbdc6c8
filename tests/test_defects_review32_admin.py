"""Review 32, the admin page and the breaker gauge at scale, and their open edges.

A memory store holds a breaker and a retry budget per upstream host its calls named
(up to 10,000 each by default) and up to 100,000 limiter keys. Each refresh of an open
admin page aged every breaker and budget under the store's lock and sorted every key,
on the event loop: 40 ms at 10,000 breakers, 550 ms at 100,000, every request on the
service waiting meanwhile (benchmarks/admin_snapshot.py). The page lists 200 of each.
"""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Host, Route, Router

from fidelity_mw import (
    BreakerConfig,
    Engine,
    FidelityMiddleware,
    Policy,
    RetryConfig,
    StateConfig,
)
from fidelity_mw.admin import AdminApp
from fidelity_mw.admin.view import snapshot_configs
from fidelity_mw.decide.breaker import CLOSED, FAILURE, SUCCESS
from fidelity_mw.decide.budget import BudgetWindow
from fidelity_mw.overrides import mark
from fidelity_mw.state import memory as memory_module
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.snapshot import first_breakers, top_budgets, top_limiter_keys
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT

pytestmark = pytest.mark.anyio

T0 = 1_000.0
BREAKER = BreakerConfig(min_calls=2, open_jitter=0.0, open_s=30.0, open_min_s=30.0, window_s=10.0)
RETRY = RetryConfig(budget_ratio=1.0, budget_window_s=10.0)


def _breaker_rank(item: tuple[str, Any]) -> tuple[bool, bool]:
    return item[1].state == CLOSED, not item[0].startswith("route:")


def _filled(n: int) -> MemoryStore:
    """n upstream breakers and budgets at T0 (every 97th breaker open), two route
    breakers among them, budgets with 1 to 6 retries, and a few stale ones that held
    many requests and retries 100 s ago."""
    store = MemoryStore(max_breakers=10_000)
    for i in range(n):
        if i == n // 3:
            for route in ("route:/a", "route:/b"):
                store.record_now(
                    route, BREAKER, store.gate_now(route, BREAKER, T0), SUCCESS, False, T0
                )
        key = f"upstream:h{i}.example"
        gate = store.gate_now(key, BREAKER, T0)
        store.record_now(key, BREAKER, gate, SUCCESS, False, T0)
        if i % 97 == 5:
            for _ in range(2):
                store.record_now(key, BREAKER, gate, FAILURE, False, T0)
        budget = f"budget:h{i}.example"
        if i % 151 == 3:  # stale: busy (and retrying) long ago, nothing in the window now
            old = f"budget:old{i}.example"
            for _ in range(50):
                store.budget_request_now(old, RETRY, T0 - 100.0)
            for _ in range(10):
                assert store.budget_try_retry_now(old, RETRY, T0 - 100.0)[0]
        store.budget_request_now(budget, RETRY, T0)
        if i % 101 == 7:
            for _ in range(9):
                store.budget_request_now(budget, RETRY, T0)
            for _ in range(1 + (i // 101) % 6):
                assert store.budget_try_retry_now(budget, RETRY, T0)[0]
    return store


async def test_the_page_lists_the_first_breakers_and_budgets_and_ages_only_those() -> None:
    store = _filled(3_000)
    breaker_ends = {key: state._bucket_end for key, state in store.breakers.items()}
    now = T0 + 1.5  # past the current bucket's end (1 s buckets): aging rotates them
    engine = Engine(Policy(), store=store, clock=FakeClock(now))
    doc = await AdminApp(engine, top_breakers=40, top_budgets=5).state(engine)

    # what is listed: the open ones, then the route breakers, then closed ones in the
    # store's order, as a stable sort of them all would give; the count is all of them
    listed = [b["key"] for b in doc["breakers"]]
    expected = [key for key, _ in sorted(store.breakers.items(), key=_breaker_rank)[:40]]
    assert listed == expected
    assert [b["state"] for b in doc["breakers"]][:31] == ["open"] * 31
    assert listed[31:33] == ["route:/a", "route:/b"]
    assert doc["store"]["breaker_count"] == 3_002
    # only the breakers listed were aged (under the store's lock): not all 3,002
    aged = {key for key, state in store.breakers.items() if state._bucket_end != breaker_ends[key]}
    assert aged == set(listed)
    for row in doc["breakers"]:
        calls, failures, slow = store.breakers[row["key"]].totals(now)
        assert (row["calls"], row["failures"], row["slow"]) == (calls, failures, slow)

    # budgets: the most retries first, then the most requests; the stale ones (50
    # requests 100 s ago) hold nothing now and are not among them
    totals = {key: window.totals(now) for key, window in store.budgets.items()}
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1][1], -kv[1][0]))[:5]
    assert [(b["key"], b["requests"], b["retries"]) for b in doc["budgets"]] == [
        (key, requests, retries) for key, (requests, retries) in ranked
    ]
    assert [b["retries"] for b in doc["budgets"]] == [6, 6, 6, 6, 6]
    assert doc["store"]["budget_count"] == 3_000 + 20  # (20 stale)


async def test_budgets_are_aged_only_while_they_can_still_make_the_list() -> None:
    store = _filled(3_000)
    ends = {key: window._bucket_end for key, window in store.budgets.items()}
    engine = Engine(Policy(), store=store, clock=FakeClock(T0 + 1.5))
    doc = await AdminApp(engine, top_budgets=5).state(engine)
    aged = {key for key, window in store.budgets.items() if window._bucket_end != ends[key]}
    assert {b["key"] for b in doc["budgets"]} <= aged
    assert len(aged) <= 10, len(aged)  # not 3,000


async def test_the_snapshot_is_taken_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Choosing what to list is still one pass over every breaker, budget and key: in a
    worker thread the loop keeps its turns meanwhile."""
    threads: list[int] = []
    taken = memory_module.local_snapshot

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return taken(*args, **kwargs)

    monkeypatch.setattr(memory_module, "local_snapshot", spy)
    store = _filled(50)
    engine = Engine(Policy(), store=store, clock=FakeClock(T0 + 1.5))
    doc = await AdminApp(engine).state(engine)
    assert doc["store"]["breaker_count"] == 52
    assert threads
    assert threads[0] != threading.get_ident()


def test_first_breakers_is_a_stable_sort_by_rank_cut_at_the_limit() -> None:
    rng = random.Random(32)
    states = ("closed", "open", "half_open")
    for _ in range(300):
        n = rng.randrange(0, 60)
        keys = [
            f"{rng.choice(('route:', 'upstream:', 'route', 'routf:'))}{rng.randrange(20)}"
            for _ in range(n)
        ]
        breakers = [SimpleNamespace(state=rng.choice(states)) for _ in range(n)]
        limit = rng.randrange(0, n + 3)
        for routes_first in (False, True):

            def rank(
                i: int, routes_first: bool = routes_first, keys: list[str] = keys, b: Any = breakers
            ) -> tuple[bool, bool]:
                closed = b[i].state == CLOSED
                other = not keys[i].startswith("route:")
                return (other, closed) if routes_first else (closed, other)

            held = [b.state for b in breakers]
            got = first_breakers(keys, held, limit, routes_first=routes_first)
            assert got == sorted(range(n), key=rank)[:limit]


def test_top_budgets_matches_aging_and_sorting_them_all() -> None:
    rng = random.Random(3232)
    configs = [RetryConfig(budget_window_s=w) for w in (1.0, 10.0, 60.0)]
    for _ in range(200):
        n = rng.randrange(0, 40)
        windows = [BudgetWindow(rng.choice(configs)) for _ in range(n)]
        for window in windows:
            for _ in range(rng.randrange(0, 6)):
                at = rng.uniform(0.0, 100.0)
                at = max(at, window._bucket_end - window._bucket_s)  # time moves forward
                window.request(at)
                if rng.random() < 0.4:
                    window.spend(at)
        now = rng.uniform(50.0, 200.0)
        limit = rng.randrange(0, n + 3)
        got = top_budgets(windows, now, limit)
        totals = [w.totals(now) for w in windows]
        expected = sorted(range(n), key=lambda i: (-totals[i][1], -totals[i][0]))[:limit]
        assert got == [(i, *totals[i]) for i in expected]


def test_top_limiter_keys_are_the_busiest_as_a_full_sort_lists_them() -> None:
    rng = random.Random(7)
    for _ in range(100):
        tats = {f"k{i}": rng.choice((rng.uniform(0.0, 20.0), 10.0)) for i in range(50)}
        now, top = 10.0, rng.randrange(0, 60)
        got = top_limiter_keys(tats, now, top, "memory", 0.0)
        expected = sorted(((tat - now, k) for k, tat in tats.items() if tat > now), reverse=True)
        assert [(v.backlog_s, v.key) for v in got] == expected[:top]


async def test_limiter_keys_listed_by_a_memory_store() -> None:
    store = MemoryStore()
    spec = LimitSpec("per-client", 1.0, 10.0, 1, False)
    for i in range(30):
        for _ in range(i % 7):
            store.admit_now(None, None, [f"per-client|c{i}"], [spec], T0)
    snap = await store.snapshot(T0, top=4)
    assert snap.limiter_key_count == 30 - 5  # (i % 7 == 0: never admitted, no key)
    assert [(v.key, v.backlog_s) for v in snap.limiter_keys] == [
        ("per-client|c6", 6.0),
        ("per-client|c27", 6.0),
        ("per-client|c20", 6.0),
        ("per-client|c13", 6.0),
    ]


# ---------------------------------------------------------------- the page's headers


async def _admin_get(app: Any, path: str, client_ip: str = "127.0.0.1") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client_ip, 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.get(path)


async def test_the_page_sends_a_strict_content_security_policy() -> None:
    """The page serves a script (and rev30t fixed an XSS through the root path): only
    its own script and style may run, by a nonce fresh per page; it fetches its JSON
    from its own origin, and no page may frame it."""
    engine = Engine(Policy(), clock=FakeClock())
    admin = AdminApp(engine)
    first, second = await _admin_get(admin, "/"), await _admin_get(admin, "/")
    nonces = []
    for page in (first, second):
        assert page.status_code == 200
        policy = dict(
            part.strip().split(" ", 1)
            for part in page.headers["content-security-policy"].split(";")
        )
        nonce = policy["script-src"].removeprefix("'nonce-").removesuffix("'")
        assert policy == {
            "default-src": "'none'",
            "script-src": f"'nonce-{nonce}'",
            "style-src": f"'nonce-{nonce}'",
            "connect-src": "'self'",
            "base-uri": "'none'",
            "form-action": "'none'",
            "frame-ancestors": "'none'",
        }
        assert page.text.count(f'<script nonce="{nonce}">') == 1
        assert page.text.count(f'<style nonce="{nonce}">') == 1
        assert page.text.count("<script") == page.text.count("<style") == 1
        assert len(nonce) >= 22
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["x-frame-options"] == "DENY"
        nonces.append(nonce)
    assert nonces[0] != nonces[1]


@pytest.mark.parametrize(
    ("path", "client_ip", "status"),
    [("/state.json", "127.0.0.1", 200), ("/nope", "127.0.0.1", 404), ("/", "203.0.113.9", 403)],
)
async def test_every_other_answer_is_locked_down(path: str, client_ip: str, status: int) -> None:
    engine = Engine(Policy(), clock=FakeClock())
    response = await _admin_get(AdminApp(engine), path, client_ip)
    assert response.status_code == status
    assert (
        response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    )
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert len(response.headers.get_list("content-security-policy")) == 1


# ---------------------------------------------------------------- the plans' breakers


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def test_a_breaker_declared_on_a_host_routed_endpoint_is_found_for_the_page() -> None:
    """The page ages a Redis breaker's window with the breaker's config, looked up in
    the engine's plans. Only the plans by (method, path) were searched: an app with Host
    routes (or a path seen under two root paths) has its plans in `_host_plans`, so a
    breaker declared on its endpoint in code was aged with the policy's window (30 s,
    not the endpoint's 2 s)."""
    own = BreakerConfig(window_s=2.0, min_calls=3)
    endpoint = mark(_ok, breaker=own)
    app = Starlette(
        routes=[Host("api.example.com", app=Router(routes=[Route("/items/{id}", endpoint)]))]
    )
    engine = FidelityMiddleware(app, policy=Policy(), telemetry=False).engine
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/items/1",
        "headers": [(b"host", b"api.example.com")],
    }
    plan = engine.plan_for(scope)
    assert plan.breaker == own
    assert plan.breaker_key == "route:api.example.com/items/{id}"
    assert not engine._plans  # (host-routed: cached by host)
    assert snapshot_configs(engine).breaker(plan.breaker_key) == own
    # another root path: a plan of its own, beside the first one's
    under = engine.plan_for({**scope, "root_path": "/v2", "path": "/v2/items/1"})
    assert snapshot_configs(engine).breaker(under.breaker_key or "") == own


# ---------------------------------------------------------------- a Redis store's listing


@pytest.mark.redis
async def test_a_redis_snapshot_reads_in_chunks_and_probes_only_what_it_lists(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis names keys by hash, so the page reads every key this instance used, at
    10,000 breakers one pipeline of 30,000 commands: redis-py packed and parsed them on
    the event loop for 100 ms, every request waiting. Now in chunks of 200 commands (the
    loop runs between them), and the probe count (ZCARD) only for the breakers listed."""
    import redis as redis_sync

    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.state.snapshot import SnapshotConfigs

    store = RedisStore(
        config=StateConfig(url=redis_url, key_prefix="adm32", fleet_share_max_age_s=0.0, **PATIENT)
    )
    direct = redis_sync.Redis.from_url(redis_url)
    try:
        server_now = float(direct.time()[0])
        writes = direct.pipeline(transaction=False)
        keys = [f"upstream:h{i:04d}.example" for i in range(1_200)]
        for i, key in enumerate(keys):
            opened = i % 300 == 17
            fields = {"st": "open", "ep": 1, "ou": server_now + 30, "oa": server_now}
            writes.hset(store.breaker_keys(key)[0], mapping=fields if opened else {"co": 0})
        for i in range(300):
            retries = ",".join(["0"] * 9 + [str(i % 7)])
            writes.hset(
                store.key("bu", f"budget:h{i:04d}.example"),
                mapping={
                    "be": server_now + 1,
                    "ix": 9,
                    "rq": ",".join(["0"] * 9 + ["9"]),
                    "rt": retries,
                },
            )
        writes.execute()
        client = store.client()
        sent: list[list[str]] = []
        pipeline = client.pipeline

        def spy(*args: Any, **kwargs: Any) -> Any:
            pipe = pipeline(*args, **kwargs)
            execute = pipe.execute

            async def counted(*a: Any, **kw: Any) -> Any:
                sent.append([str(command[0][0]) for command in pipe.command_stack])
                return await execute(*a, **kw)

            pipe.execute = counted
            return pipe

        monkeypatch.setattr(client, "pipeline", spy)
        configs = SnapshotConfigs(
            breaker=lambda key: BREAKER, retry=lambda key: RETRY, top_breakers=10, top_budgets=5
        )
        snap = await store.snapshot(0.0, configs=configs)
    finally:
        direct.close()
        await store.aclose()
    assert max(len(commands) for commands in sent) <= 200
    assert sum(len(commands) for commands in sent) == 1 + 1_200 + 300 + 10
    assert [c for commands in sent for c in commands].count("ZCARD") == 10
    assert snap.breaker_count == 1_200
    assert [v.key for v in snap.breakers] == [keys[i] for i in (17, 317, 617, 917)] + keys[:6]
    assert [v.state for v in snap.breakers] == ["open"] * 4 + ["closed"] * 6
    assert snap.budget_count == 300
    assert [(v.key, v.retries) for v in snap.budgets] == [
        (f"budget:h{i:04d}.example", 6) for i in (6, 13, 20, 27, 34)
    ]


@pytest.mark.redis
async def test_a_tiered_snapshot_lists_the_first_cached_breakers_and_counts_them_all(
    redis_url: str,
) -> None:
    from fidelity_mw.clock import SYSTEM_CLOCK
    from fidelity_mw.state.snapshot import SnapshotConfigs
    from fidelity_mw.state.tiered import TieredStore

    # no background sync meanwhile: each one moves the breakers it sends to the end of the
    # table (its cursor), and a busy machine that took over 100 ms for these admissions
    # listed route:/r1 first (each breaker is synced at its first admission all the same)
    config = StateConfig(
        url="tiered+" + redis_url, key_prefix="adm32t", sync_interval_ms=60_000, **PATIENT
    )
    store = TieredStore(config=config)
    spec = LimitSpec("per-client", 0.1, 4.0, 1, False)
    now = SYSTEM_CLOCK.monotonic  # the store's own clock: it drops what looks idle on it
    try:
        for i in range(5):
            for client in range(i + 1):
                await store.admit(f"route:/r{i}", BREAKER, [f"per-client|c{client}"], [spec], now())
        configs = SnapshotConfigs(top_breakers=2)
        snap = await store.snapshot(now(), top=2, configs=configs)
    finally:
        await store.aclose()
    assert snap.breaker_count == 5
    assert [v.key for v in snap.breakers] == ["route:/r0", "route:/r1"]
    assert snap.limiter_key_count == 5
    assert len(snap.limiter_keys) == 2


async def test_a_405_names_every_method_the_page_answers() -> None:
    """The page answers GET and HEAD; its 405 said `Allow: GET` (RFC 9110 10.2.1: the
    methods the resource supports), where Starlette's own routes say `GET, HEAD`."""
    engine = Engine(Policy(), clock=FakeClock())
    transport = httpx.ASGITransport(app=AdminApp(engine), client=("127.0.0.1", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        refused = await c.post("/state.json")
        head = await c.head("/state.json")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD"
    assert head.status_code == 200


# ---------------------------------------------------------------- the breaker gauge


def test_the_breaker_gauge_keeps_routes_then_those_not_closed_at_scale() -> None:
    """The gauge (scraped on the event loop by prometheus_client's ASGI app) looked at
    every breaker of a memory store and sorted them to keep 1,024: now it looks only at
    those that can keep a place. What it reports is the same: route breakers, then
    those not closed, then closed ones in the store's order."""
    from fidelity_mw.telemetry.observer import BreakerWatch

    store = _filled(3_000)
    engine = Engine(Policy(), store=store, clock=FakeClock(T0 + 1.5))
    watch = BreakerWatch()
    watch.engines.add(engine)
    observed = watch.breaker_observations()
    current = [
        (o.attributes["fidelity.subject"], o.attributes["fidelity.breaker.state"])
        for o in observed
        if o.value == 1
    ]
    assert len(current) == 1_024
    assert len(observed) == 3 * 1_024
    ranked = sorted(
        store.breakers.items(),
        key=lambda kv: (not kv[0].startswith("route:"), kv[1].state == CLOSED),
    )[:1_024]
    assert current == [(key.partition(":")[2], state.state) for key, state in ranked]
    assert current[:2] == [("/a", "closed"), ("/b", "closed")]
    assert [state for _, state in current[2:33]] == ["open"] * 31


# ---------------------------------------------------------------- the page in Chromium


class _SlowStore(MemoryStore):
    """A store slow to read (thousands of Redis keys): counts the snapshots in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.most = 0
        self.done = 0

    async def snapshot(self, now: float, **kwargs: Any) -> Any:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.4)  # the slow read itself: eight of the page's intervals
            return await super().snapshot(now, **kwargs)
        finally:
            self.in_flight -= 1
            self.done += 1


@pytest.mark.slow
def test_an_open_page_asks_again_only_once_answered(tmp_path: Path) -> None:
    """The page asked for its JSON every `refresh_s` whether or not the last answer had
    come: on a store slower to read than that, one open page kept several snapshots
    running on the server at once, each a full read of the store."""
    from test_admin import _chromium

    found = _chromium()
    if found is None:
        pytest.fail(
            "chromium and chromedriver are needed: apt-get install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from _loopback import LoopbackServer

    store = _SlowStore()
    engine = Engine(Policy(), store=store)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    with LoopbackServer(AdminApp(engine, refresh_s=0.05)) as server:
        driver = webdriver.Chrome(options=options, service=Service(found[1]))
        try:
            driver.set_page_load_timeout(30)
            driver.get(server.url + "/")
            WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda _d: store.done >= 3)
        finally:
            driver.quit()
    assert store.most == 1
