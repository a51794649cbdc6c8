"""Operator-facing defects that earlier rounds found and left alone (review 35, ops)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fidelity_mw.policy import BreakerConfig, ConcurrencyConfig, Policy, RouteConfig, StateConfig
from fidelity_mw.testing import FakeClock
from fidelity_mw.tools.cli import main

BREAKER = BreakerConfig(min_calls=2, open_jitter=0.0, open_s=30.0, open_min_s=30.0, window_s=10.0)

# ---------------------------------------------- audit: a gate over files it never read


def _tree(tmp_path: Path, *, finding: bool) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    body = "import tenacity\n\n@tenacity.retry\ndef fetch():\n    pass\n" if finding else "x = 1\n"
    (root / "good.py").write_text(body)
    (root / "half_edited.py").write_text("def broken(:\n")
    (root / "latin.py").write_bytes(b"name = '\xe9'\n")  # no coding line: not UTF-8
    return root


def test_audit_fail_on_fails_when_files_were_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CI gate (`--fail-on`) exited 0 over a tree whose unparsable files it never read."""
    root = _tree(tmp_path, finding=False)
    assert main(["audit", str(root), "--fail-on", "any"]) == 3
    captured = capsys.readouterr()
    summary = captured.out.splitlines()[-1]
    assert summary.endswith("1 file(s) scanned, 2 skipped (not read)")
    assert "2 file(s) could not be read" in captured.err
    assert "--allow-skipped" in captured.err


def test_audit_skipped_outranks_findings_and_can_be_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path, finding=True)
    assert main(["audit", str(root), "--fail-on", "retry"]) == 3
    # opted out: the findings decide, the skipped files are still listed
    assert main(["audit", str(root), "--fail-on", "retry", "--allow-skipped"]) == 1
    out = capsys.readouterr().out
    assert out.count("skipped, not scanned") == 4  # two files, two runs
    assert main(["audit", str(root), "--fail-on", "breaker", "--allow-skipped"]) == 0
    # a report, not a gate: never fails
    assert main(["audit", str(root)]) == 0


def test_audit_json_lists_skipped_and_the_opt_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path, finding=False)
    assert main(["audit", "--json", str(root), "--fail-on", "any"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert sorted(Path(s["file"]).name for s in doc["skipped"]) == ["half_edited.py", "latin.py"]
    assert doc["allow_skipped"] is False
    assert doc["scanned"] == 1
    assert main(["audit", "--json", str(root), "--fail-on", "any", "--allow-skipped"]) == 0
    assert json.loads(capsys.readouterr().out)["allow_skipped"] is True


# ---------------------------------------------- admin: a stable view past the key cache


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_full_key_cache_lets_the_oldest_go_not_every_key(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Redis store lists the breakers it has used from its key cache (Redis holds them
    by hash only). The cache was cleared at once when full: at ~9,000 hosts of its 10,000,
    the page showed only the hosts used since the last clear (a handful, then growing).
    Now it lets the oldest go in small steps; the page keeps the most recent ones."""
    import redis as redis_sync

    from fidelity_mw.state import redis as redis_module
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.state.snapshot import SnapshotConfigs
    from redis_server import PATIENT, QUIET

    # the same rule at a size a test fills in a moment
    monkeypatch.setattr(redis_module, "_KEY_CACHE_MAX", 160)
    monkeypatch.setattr(redis_module, "_KEY_CACHE_EVICT", 10, raising=False)
    store = RedisStore(config=StateConfig(url=redis_url, key_prefix="ops35kc", **PATIENT, **QUIET))
    direct = redis_sync.Redis.from_url(redis_url)
    hosts = [f"upstream:h{i:04d}.example" for i in range(400)]
    configs = SnapshotConfigs(
        breaker=lambda key: BREAKER, retry=lambda key: None, top_breakers=500, top_budgets=0
    )
    counts: list[int] = []
    try:
        for start in range(0, len(hosts), 40):
            writes = direct.pipeline(transaction=False)
            for host in hosts[start : start + 40]:
                writes.hset(store.breaker_keys(host)[0], mapping={"co": 0})
            writes.execute()
            snap = await store.snapshot(0.0, configs=configs)
            counts.append(snap.breaker_count)
            listed = {v.key for v in snap.breakers}
            # every host of the last 150 used is on the page
            recent = hosts[max(0, start + 40 - 150) : start + 40]
            assert listed.issuperset(recent), start
    finally:
        direct.close()
        await store.aclose()
    # 40, 80, ..., 160, then never fewer than 150 (cleared at once: 40, 80, 120, 160, 40, ...)
    assert counts[:4] == [40, 80, 120, 160]
    assert min(counts[4:]) >= 150
    assert max(counts) <= 160


@pytest.mark.anyio
async def test_the_admin_page_keys_its_hashers_by_engine_not_by_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`AdminApp._hashers` was keyed by `id(engine)`: an engine collected and a new one
    given the same id got the old engine's hasher (the page's key hashes then disagree
    with the new engine's telemetry), and every engine shown left its hasher behind."""
    import gc

    from fidelity_mw import Engine
    from fidelity_mw.admin import AdminApp
    from fidelity_mw.admin import app as app_module

    made: list[tuple[Engine, object]] = []
    used: list[object] = []

    def hasher_for(engine: Engine) -> object:
        tag = object()
        made.append((engine, tag))
        return tag

    def spy_render(
        engine: Engine, snap: object, now: float, since: object, hasher: object, **_: object
    ) -> dict[str, object]:
        used.append(hasher)
        return {}

    monkeypatch.setattr(app_module, "key_hasher", hasher_for)
    monkeypatch.setattr(app_module, "render", spy_render)
    # the same id for every engine, as CPython gives a freed object's address to a new one
    monkeypatch.setattr(app_module, "id", lambda obj: 1, raising=False)
    admin = AdminApp()
    first = Engine(clock=FakeClock())
    await admin.state(first)
    await admin.state(first)
    second = Engine(clock=FakeClock())
    await admin.state(second)
    assert [tag for _, tag in made] == [used[0], used[2]]
    assert used[0] is used[1]
    assert used[2] is not used[0]
    del first, second, made[:]
    gc.collect()
    assert len(admin._hashers) == 0  # nothing kept for engines that are gone


# ---------------------------------------------- FastAPI: the middleware's own 503/504 in OpenAPI


def _fastapi_app(document: bool) -> tuple[Any, Policy]:
    from fastapi import FastAPI

    from fidelity_mw import FidelityMiddleware
    from fidelity_mw.fastapi import Fidelity

    policy = Policy(
        routes=[
            RouteConfig(match="/cheap", breaker=False),
            RouteConfig(match="/recorded", breaker=False, enforce=False),
            RouteConfig(match="/pooled/*", breaker=False, concurrency=ConcurrencyConfig(limit=4)),
        ]
    )
    app = FastAPI()

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {}

    @app.get("/cheap")
    async def cheap() -> dict[str, str]:
        return {}

    @app.get("/recorded")
    async def recorded() -> dict[str, str]:
        return {}

    @app.post("/pooled/{item}")
    async def pooled(item: str) -> dict[str, str]:
        return {}

    Fidelity(app, document_middleware=document)
    app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)
    return app, policy


def _refusals(schema: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    return {
        (path, method): set(entry["responses"]) & {"503", "504"}
        for path, item in schema["paths"].items()
        for method, entry in item.items()
    }


def test_fastapi_schema_lists_the_middlewares_503_and_504_when_asked() -> None:
    """A route under FidelityMiddleware can be answered 503 (its breaker, its bulkhead) and
    504 (its deadline), and the schema said nothing of them on routes without a form.
    `Fidelity(document_middleware=True)` lists them as the route's policy gives them."""
    from fidelity_mw import Engine

    app, policy = _fastapi_app(document=True)
    documented = _refusals(app.openapi())
    assert documented == {
        ("/plain", "get"): {"503", "504"},
        ("/cheap", "get"): {"504"},
        ("/recorded", "get"): set(),
        ("/pooled/{item}", "post"): {"503", "504"},
    }
    # ... and what the middleware's own plans for those paths hold
    engine = Engine(policy, clock=FakeClock())
    for (path, method), statuses in documented.items():
        scope = {
            "type": "http",
            "method": method.upper(),
            "path": path.replace("{item}", "x"),
            "root_path": "",
            "app": app,
            "headers": [],
        }
        plan = engine.plan_for(scope)
        sheds = plan.breaker is not None or plan.concurrency is not None
        assert ("503" in statuses) == sheds, path
        assert ("504" in statuses) == plan.enforce, path
    entry = app.openapi()["paths"]["/plain"]["get"]["responses"]["503"]
    assert "Retry-After" in entry["headers"]


def test_fastapi_schema_is_unchanged_without_the_opt_in() -> None:
    app, _ = _fastapi_app(document=False)
    assert all(not statuses for statuses in _refusals(app.openapi()).values())


# ---------------------------------------------- fleet: a dead member after a clock step back


@pytest.mark.redis
def test_a_dead_member_leaves_the_fleet_one_ttl_after_a_clock_step_back(
    redis_url: str, redis_clock: Any
) -> None:
    """Redis's clock goes back 100 s (a failover to a replica whose clock is behind)
    just after member b's last announcement, and b is dead. Its score, 100 s "ahead",
    kept it live for the member ttl plus the step: a counted as one of two for 105 s,
    enforcing half of each limit in an outage. Now it is taken as seen at the step and
    leaves one ttl later, in the model (FleetTable) and in fleet.lua alike."""
    import redis as redis_sync

    from fidelity_mw.decide.fleet import FleetTable
    from fidelity_mw.state.fleet import FLEET, MEMBER_TTL_S
    from redis_clock import clocked

    script = clocked(FLEET)
    client = redis_sync.Redis.from_url(redis_url, socket_timeout=2.0)
    keys = ("{ops35}:fleet", "{ops35}:fleet:load")
    table = FleetTable()
    model: list[tuple[int, float | None]] = []
    lua: list[tuple[int, float | None]] = []
    times = [1_000.0, 1_000.5, 1_001.0, 1_001.5]  # a, b, a, b: then b is gone
    times += [900.0 + t for t in range(12)]  # the step back; a announces each second
    members = ["a", "b", "a", "b"] + ["a"] * 12
    try:
        client.delete(*keys)
        for now, member in zip(times, members, strict=True):
            redis_clock.set(now)
            model.append(table.announce(member, 10, now, MEMBER_TTL_S))
            reply = client.eval(script.source, 2, *keys, member, MEMBER_TTL_S, 10)
            lua.append((int(reply[0]), None if float(reply[1]) == -1.0 else float(reply[1])))
            live = {m.decode() for m in client.zrange(keys[0], 0, -1)}
            assert live == set(table.members)
            stored = {
                k.decode(): tuple(float(x) for x in v.split())
                for k, v in client.hgetall(keys[1]).items()
            }
            assert stored.keys() == table.loads.keys()
            for m, values in stored.items():
                assert values == pytest.approx(tuple(table.loads[m]), rel=1e-12)
            # nobody is seen after now
            assert max(float(s) for _, s in client.zrange(keys[0], 0, -1, withscores=True)) <= now
    finally:
        client.delete(*keys)
        client.close()
    assert [size for size, _ in lua] == [size for size, _ in model]
    for (_, got), (_, want) in zip(lua, model, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, rel=1e-12)
    after_step = [size for size, _ in model[4:]]
    # b, taken as seen at 900, is live while 900 > now - 5: until 905, then gone
    assert after_step == [2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    assert model[-1] == (1, 1.0)  # a alone: its whole load, its fraction known again


# ---------------------------------------------- redis: what is queued for Redis at shutdown


def _window_total(url: str, hash_key: str) -> int:
    import redis as redis_sync

    direct = redis_sync.Redis.from_url(url)
    try:
        raw = direct.hget(hash_key, "w")
    finally:
        direct.close()
    return 0 if raw is None else sum(int(float(x)) for x in raw.decode().replace(",", " ").split())


@pytest.mark.redis
@pytest.mark.anyio
async def test_aclose_sends_what_is_queued_when_redis_answers(own_redis: Any) -> None:
    """Plain successes wait for the next call about their breaker, or one sync interval.
    A process closing in between (a deploy's shutdown: lifespan -> aclose) cancelled the
    flush and Redis never counted them. Now aclose sends them first, for at most 1 s."""
    from fidelity_mw.decide.breaker import SUCCESS
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.testing import seeded_random
    from redis_server import PATIENT, QUIET

    config = StateConfig(url=own_redis.url, sync_interval_ms=60_000, **PATIENT, **QUIET)  # type: ignore[arg-type]
    store = RedisStore(config=config, rng=seeded_random(5))
    key = "route:r"
    try:
        result = await store.admit(key, BREAKER, [], [], 0.0)
        assert result.gate is not None
        for _ in range(3):
            await store.record(key, BREAKER, result.gate, SUCCESS, False, 0.0)
        assert _window_total(own_redis.url, store.key("br", key)) == 0  # still queued here
    finally:
        await store.aclose()
    assert _window_total(own_redis.url, store.key("br", key)) == 3
    assert store.stats.dropped_records == 0


@pytest.mark.redis
@pytest.mark.anyio
async def test_aclose_says_how_many_outcomes_it_could_not_send(
    own_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis is down at shutdown: the queued outcomes (here 3 plain successes and one
    probe outcome of a gate whose reply was lost) went without a word. Now counted and
    logged."""
    import logging

    from fidelity_mw.decide.breaker import FAILURE, SUCCESS, Gate
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.testing import seeded_random
    from redis_server import PATIENT, QUIET

    config = StateConfig(url=own_redis.url, sync_interval_ms=60_000, **PATIENT, **QUIET)  # type: ignore[arg-type]
    store = RedisStore(config=config, rng=seeded_random(5))
    key = "route:r"
    try:
        result = await store.admit(key, BREAKER, [], [], 0.0)
        assert result.gate is not None
        for _ in range(3):
            await store.record(key, BREAKER, result.gate, SUCCESS, False, 0.0)
        own_redis.stop()
        for _ in range(3):  # (the first may find only the reply lost)
            other = await store.admit("route:other", BREAKER, [], [], 0.0)
            if not store.health.up:
                break
        assert other.source == "fallback"
        assert not store.health.up
        lost = Gate("allow", "closed", -1, 0.0, sent_probe_id=77)  # its admit's reply lost
        await store.record(key, BREAKER, lost, FAILURE, False, 0.0)
        dropped = store.stats.dropped_records
    finally:
        with caplog.at_level(logging.WARNING, logger="fidelity_mw.redis"):
            await store.aclose()
    said = [r.getMessage() for r in caplog.records if "closing the Redis store" in r.getMessage()]
    assert said == [
        "fidelity_mw: closing the Redis store with 4 breaker outcome(s) (probe outcomes "
        "reported late, plain successes) and 0 retry-budget request count(s) not sent: "
        "Redis is unreachable"
    ]
    assert store.stats.dropped_records == dropped + 4


# ---------------------------------------------- redis: a store used again after aclose


def _our_connections(url: str) -> int:
    import redis as redis_sync

    direct = redis_sync.Redis.from_url(url)
    try:
        return len(direct.client_list()) - 1  # (not this one)
    finally:
        direct.close()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_store_used_after_aclose_reopens_and_says_so(
    own_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A store is used after `aclose` when an app's lifespan runs twice (`with
    TestClient(app)` in two tests, a server that restarts the app in process). It
    quietly opened a new client: fine there, and a bug to find where the close was
    meant to be the end (an engine shared with an app that closed it). The reopen is
    kept (an error would turn the second lifespan's requests into fallback decisions)
    and said once per reopen; the reopened client is closed by the next aclose, and a
    store closed while Redis was down finds it again."""
    import asyncio
    import logging

    from _redis_patience import up_after_probe
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.testing import seeded_random
    from redis_server import PATIENT, QUIET

    config = StateConfig(url=own_redis.url, **PATIENT, **QUIET)  # type: ignore[arg-type]
    store = RedisStore(config=config, clock=FakeClock(), rng=seeded_random(5))

    def reopened() -> int:
        return sum("used again after aclose()" in r.getMessage() for r in caplog.records)

    caplog.set_level(logging.INFO, logger="fidelity_mw.redis")
    try:
        assert (await store.admit("route:r", BREAKER, [], [], 0.0)).source == "redis"
        assert reopened() == 0
        await store.aclose()
        assert _our_connections(own_redis.url) == 0
        assert (await store.admit("route:r", BREAKER, [], [], 0.0)).source == "redis"
        assert reopened() == 1
        assert (await store.admit("route:r", BREAKER, [], [], 0.0)).source == "redis"
        assert reopened() == 1  # once per reopen
        await store.aclose()
        assert _our_connections(own_redis.url) == 0  # the new client closed too
        # closed while Redis is down: the next use probes, and finds it back
        assert (await store.admit("route:r", BREAKER, [], [], 0.0)).source == "redis"
        own_redis.stop()
        for _ in range(3):
            await store.admit("route:r", BREAKER, [], [], 0.0)
            if not store.health.up:
                break
        assert not store.health.up
        await store.aclose()
        own_redis.start()
        sources = []
        for _ in range(200):  # real round trips; the fake clock, moved to each probe
            sources.append((await store.admit("route:r", BREAKER, [], [], 0.0)).source)
            if sources[-1] == "redis":
                break
            await asyncio.sleep(0.005)
            up_after_probe(store)
        assert sources[-1] == "redis"
        assert reopened() == 3
    finally:
        await store.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_tiered_store_syncs_what_it_holds_before_it_closes(redis_url: str) -> None:
    """A tiered process counts breaker outcomes and spends leased units locally, sent at
    its next sync. Closed in between (a deploy's shutdown), the failures never reached
    the fleet's breaker and the units it held stayed out of the fleet's bucket until
    they refilled. Now aclose syncs them first (at most 1 s, if Redis answers)."""
    import time

    from fidelity_mw.decide.breaker import FAILURE
    from fidelity_mw.state.base import LimitSpec
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.state.tiered import TieredStore
    from fidelity_mw.testing import seeded_random
    from redis_server import PATIENT, QUIET

    burst20 = LimitSpec("l", 60.0, 1200.0, 1, False)  # 1/min, burst 20: no refill here
    prefix = f"ops35t{time.monotonic_ns()}"
    config = StateConfig(
        url="tiered+" + redis_url,
        key_prefix=prefix,
        sync_interval_ms=60_000,  # no periodic sync during the test
        **PATIENT,
        **QUIET,
    )  # type: ignore[arg-type]
    store = TieredStore(config=config, rng=seeded_random(5))
    breaker = BreakerConfig(min_calls=100, window_s=600.0)
    try:
        for _ in range(3):
            got = await store.admit("route:r", breaker, ["l|k"], [burst20], time.monotonic())
            assert got.admitted
        assert got.gate is not None
        await store.record("route:r", breaker, got.gate, FAILURE, False, time.monotonic())
        held = store.slices["l|k"].tokens
        assert held > 0
        assert store.breakers["route:r"].calls == 1
    finally:
        await store.aclose()
    exact = RedisStore(config=StateConfig(url=redis_url, key_prefix=prefix, **PATIENT, **QUIET))  # type: ignore[arg-type]
    try:
        peek = await exact.peek(["l|k"], [burst20], time.monotonic())
    finally:
        await exact.aclose()
    assert peek.limits[0].remaining == 20 - 3  # only what was admitted is spent
    assert (
        _window_total(redis_url, exact.key("br", "route:r")) >= 2
    )  # the failure: 1 call, 1 failure
    assert store.exact.stats.dropped_records == 0


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_tiered_store_closed_while_redis_is_down_says_what_it_held(
    own_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import time

    from fidelity_mw.decide.breaker import FAILURE
    from fidelity_mw.state.base import LimitSpec
    from fidelity_mw.state.tiered import TieredStore
    from fidelity_mw.testing import seeded_random
    from redis_server import PATIENT, QUIET

    burst20 = LimitSpec("l", 60.0, 1200.0, 1, False)
    config = StateConfig(url="tiered+" + own_redis.url, sync_interval_ms=60_000, **PATIENT, **QUIET)  # type: ignore[arg-type]
    store = TieredStore(config=config, rng=seeded_random(5))
    breaker = BreakerConfig(min_calls=100, window_s=600.0)
    try:
        got = await store.admit("route:r", breaker, ["l|k"], [burst20], time.monotonic())
        assert got.gate is not None
        await store.record("route:r", breaker, got.gate, FAILURE, False, time.monotonic())
        held = store.slices["l|k"].tokens
        own_redis.stop()
        for _ in range(3):  # (the first may find only the reply lost)
            await store.exact.admit("route:other", breaker, [], [], time.monotonic())
            if not store.exact.health.up:
                break
        assert not store.exact.health.up
        dropped = store.exact.stats.dropped_records
    finally:
        with caplog.at_level(logging.WARNING, logger="fidelity_mw.tiered"):
            await store.aclose()
    said = [r.getMessage() for r in caplog.records if "closing the tiered store" in r.getMessage()]
    assert said == [
        f"fidelity_mw: closing the tiered store with 1 breaker outcome(s) not sent and "
        f"{held} leased unit(s) not given back (their buckets refill on their own): "
        "Redis is unreachable"
    ]
    assert store.exact.stats.dropped_records == dropped + 1
