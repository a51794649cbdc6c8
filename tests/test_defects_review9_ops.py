"""State and operations defects of review 9 (ops9): each test failed before its fix, but
the one on tiered give-backs after a restart, which checks a suspicion that did not hold."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from _redis_patience import up_after_probe
from fidelity_mw import DecisionContext, FidelityMiddleware, Policy, RateLimit, current
from fidelity_mw.policy import StateConfig
from fidelity_mw.state import factory
from fidelity_mw.state.base import LimitSpec, state_age_s
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from fidelity_mw.tools.cli import main
from redis_clock import RedisClock
from redis_server import HOST, PATIENT, QUIET, ReplicaServer
from test_telemetry_helpers import decision_events, metric_points, pipeline

LIMIT = LimitSpec("l", 0.001, 1.0, 1, False)


async def _until(condition: Callable[[], bool], budget_s: float = 10.0) -> None:
    """Let the event loop run (real I/O: Redis round trips) until `condition` holds."""
    for _ in range(int(budget_s / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)


# ---------------------------------------------------------------- 1. a read-only replica


async def _spin(
    store: RedisStore, rounds: int, *, batch: int = 1, waits: list[float] | None = None
) -> list[str]:
    """`rounds` times: `batch` admissions in one tick, then a short real pause (the probe's
    round trip runs meanwhile), then the fake clock moved to the probe's next time (its
    backoff waits on the clock's timer, so it never waits in real time; each wait in
    `waits`)."""
    sources: list[str] = []
    for i in range(rounds):
        results = await asyncio.gather(
            *(store.admit(None, None, [f"l|{i}.{j}"], [LIMIT], 0.0) for j in range(batch))
        )
        sources += [r.source for r in results]
        await asyncio.sleep(0.01)
        up_after_probe(store, waits)
    return sources


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.parametrize("batch", [1, 4], ids=["alone", "coalesced"])
async def test_a_read_only_replica_is_one_outage_not_a_flap_per_probe(
    replica: ReplicaServer, batch: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: one `READONLY` reply marked Redis down and the PING probe (which a replica
    answers) brought it straight back, about ten outages a second per process; inside a
    coalesced batch each operation's `READONLY` never marked it down at all (every
    request paid a round trip). Now the probe asks `ROLE` and stays down on a replica."""
    clock = FakeClock()
    config = StateConfig(url=replica.url, **PATIENT, **QUIET)
    store = RedisStore(config=config, rng=seeded_random(9), clock=clock)
    caplog.set_level(logging.WARNING, "fidelity_mw.redis")
    try:
        waits: list[float] = []
        sources = await _spin(store, 20, batch=batch, waits=waits)
        assert set(sources) == {"fallback"}
        assert store.stats.outages == 1
        assert not store.health.up
        assert store.fallback_why == "read_only"
        result = await store.admit(None, None, ["l|x"], [LIMIT], 0.0)
        assert (result.source, result.why) == ("fallback", "read_only")
        probes = len(waits)
        assert probes >= 3  # the probe kept asking, and kept the store down
        read_only_lines = [r for r in caplog.records if "read-only replica" in r.getMessage()]
        assert len(read_only_lines) == 1
        # promoted (a failover): the next probe finds a primary and the store comes back
        with replica.client() as client:
            client.execute_command("REPLICAOF", "NO", "ONE")
        await _until(lambda: up_after_probe(store))
        assert store.health.up
        assert store.fallback_why is None
        result = await store.admit(None, None, ["l|y"], [LIMIT], 0.0)
        assert (result.source, result.why) == ("redis", None)
        assert store.stats.outages == 1
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.redis
async def test_the_probe_falls_back_to_a_write_when_role_is_not_allowed(
    replica: ReplicaServer,
) -> None:
    """An ACL user without ROLE (NOPERM): the probe is a script that writes (DEL of a key
    of our own), which a replica refuses as it refuses the store's scripts."""
    url = f"redis://app@{HOST}:{replica.port}/0"
    with replica.client() as client:  # (ACLs are not replicated: set on the replica)
        client.execute_command("ACL", "SETUSER", "app", "on", "nopass", "~*", "+@all", "-role")
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=url, **PATIENT, **QUIET), clock=clock)
    try:
        await _spin(store, 10)
        assert store.stats.outages == 1
        assert not store.health.up
        assert store.health.role_denied
        with replica.client() as client:
            client.execute_command("REPLICAOF", "NO", "ONE")
        await _until(lambda: up_after_probe(store))
        assert store.health.up
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.redis
async def test_the_probe_backoff_is_kept_across_a_quick_re_failure(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: every outage started its probe at 50 ms again, so a Redis that failed again
    right after each recovery was probed (and flapped) at the fastest rate for good."""
    real = RedisStore._evalsha
    failing = [True]

    async def flaky(self, client, script, keys, args):  # type: ignore[no-untyped-def]
        if failing[0]:
            raise RedisConnectionError("connection reset (test)")
        return await real(self, client, script, keys, args)

    monkeypatch.setattr(RedisStore, "_evalsha", flaky)
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    waits: list[float] = []  # the probe's backoff
    try:
        firsts = []
        for _ in range(4):
            failing[0] = True
            before = len(waits)
            await store.admit(None, None, ["l|a"], [LIMIT], 0.0)
            assert not store.health.up
            failing[0] = False
            await _until(lambda: up_after_probe(store, waits))
            assert store.health.up
            firsts.append(waits[before])
        # equal jitter: attempt k sleeps 0.05 * 2**k * (0.5..1), capped at 0.5 s
        assert firsts[0] <= 0.05
        assert firsts[-1] > 0.1, firsts
        assert store.stats.outages == 4
        # Redis up for a while (longer than the reset time): the backoff starts over
        clock.advance(60.0)
        failing[0] = True
        before = len(waits)
        await store.admit(None, None, ["l|a"], [LIMIT], 0.0)
        failing[0] = False
        await _until(lambda: up_after_probe(store, waits))
        assert waits[before] <= 0.05
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.redis
async def test_an_error_reply_while_redis_is_up_says_error_not_unreachable(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def oom(self, client, script, keys, args):  # type: ignore[no-untyped-def]
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    monkeypatch.setattr(RedisStore, "_evalsha", oom)
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET))
    try:
        result = await store.admit(None, None, ["l|a"], [LIMIT], 0.0)
        assert (result.source, result.why) == ("fallback", "error")
        assert store.health.up
        assert store.fallback_why is None
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.redis
async def test_read_only_fallback_is_in_the_decisions_and_the_fallback_gauge(
    replica: ReplicaServer,
) -> None:
    """The degradation is recorded: each fallback decision says why
    (`fidelity.detail.fallback_why = read_only`), and `fidelity.state.fallback` is 1 for
    `read_only` while the store stays on its local state."""
    pipe = pipeline()
    store = RedisStore(config=StateConfig(url=replica.url, **PATIENT, **QUIET))
    policy = Policy(rate_limits=[RateLimit(name="per-client", rate="100/s", match="/*")])
    app = Starlette(routes=[Route("/x", _ok)])
    app.add_middleware(FidelityMiddleware, policy=policy, store=store, observer=pipe.telemetry)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(3):
                assert (await client.get("/x")).status_code == 200
                await asyncio.sleep(0.02)
        assert not store.health.up
        events = [e for span in pipe.finished() for e in decision_events(span)]
        limited = [e for e in events if e["fidelity.layer"] == "ratelimit"]
        assert limited
        assert all(e["fidelity.state.source"] == "fallback" for e in limited)
        assert all(e["fidelity.detail.fallback_why"] == "read_only" for e in limited)
        gauge = {
            a["fidelity.state.fallback_why"]: p.value
            for a, p in metric_points(pipe.metrics, "fidelity.state.fallback")
        }
        assert gauge == {"read_only": 1, "unreachable": 0}
        versions = metric_points(pipe.metrics, "fidelity.policy.info")
        assert [(a, p.value) for a, p in versions] == [
            ({"fidelity.policy.version": policy.version}, 1)
        ]
    finally:
        await store.aclose()
        pipe.shutdown()


@pytest.mark.anyio
@pytest.mark.redis
async def test_on_error_closed_refusals_on_a_replica_say_read_only(replica: ReplicaServer) -> None:
    """With `on_error = "closed"` the refusal's reason stays `state_error:<Exception>`;
    its details say why the state is unavailable."""
    config = StateConfig(url=replica.url, on_error="closed", **PATIENT, **QUIET)
    seen: list[DecisionContext] = []

    async def keep(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    class Keep:
        def start(self, ctx: DecisionContext, scope: object) -> None:
            return None

        def end(self, ctx: DecisionContext, scope: object, token: object) -> None:
            seen.append(ctx)

    limit = RateLimit(name="per-client", rate="100/s", match="/*")
    policy = Policy(state=config, rate_limits=[limit])
    app = FidelityMiddleware(Starlette(routes=[Route("/x", keep)]), policy=policy, observer=Keep())
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            statuses = []
            for _ in range(3):
                statuses.append((await client.get("/x")).status_code)
                await asyncio.sleep(0.02)
        assert statuses == [503] * 3
        refusals = [d for ctx in seen for d in ctx.decisions if d.reason.startswith("state_")]
        assert [d.reason for d in refusals] == ["state_error:StateUnavailable"] * 3
        assert all(d.details["fallback_why"] == "read_only" for d in refusals)  # type: ignore[index]
    finally:
        await app.engine.aclose()


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def test_a_tiered_store_says_how_long_ago_redis_answered() -> None:
    """Found on the way: a decision taken without state (`on_error`, the store raised)
    reads the store's `fallback_age` (`state_age_s`); the tiered store had none, so its
    refusals said age 0 as if the state were fresh. No I/O: the store never connects."""
    clock = FakeClock()
    store = TieredStore(config=StateConfig(url="tiered+redis://127.0.0.1:1/0"), clock=clock)
    clock.advance(42.5)
    assert state_age_s(store) == 42.5


# ---------------------------------------------------------------- 2. credit spent, then refunded

CREDIT_T0 = 1_000.0


class _CreditRig:
    """A client with a 5/s limit (burst 5, retry credit 10 s) in front of an app whose
    `/fail` waits for the test and then answers 503 for another layer (an outbound
    breaker: its refund earns credit) and whose `/limited` answers a `Depends(limit)`-style
    429 (another limit: its refund earns none)."""

    def __init__(self, store: object, redis_clock: object | None) -> None:
        self.clock = FakeClock(CREDIT_T0)
        self.redis_clock = redis_clock
        self.release = asyncio.Event()
        self.waiting = 0
        self.reasons: list[str] = []

        async def work(request: Request) -> Response:
            ctx = current()
            assert ctx is not None
            decision = ctx.last("ratelimit")
            self.reasons.append(decision.reason if decision is not None else "")
            what = request.path_params["what"]
            if what == "fail":
                self.waiting += 1
                await self.release.wait()
                ctx.shed_by = "breaker"
                return PlainTextResponse("refused", status_code=503)
            if what == "limited":
                ctx.shed_by = "ratelimit"
                return PlainTextResponse("refused", status_code=429)
            return PlainTextResponse("ok")

        limit = RateLimit(
            name="per-client", rate="5/s", burst=5, key="header:x-client-id", retry_credit_s=10.0
        )
        app = Starlette(routes=[Route("/{what}", work)])
        app.add_middleware(
            FidelityMiddleware,
            policy=Policy(breaker=None, rate_limits=(limit,)),
            clock=self.clock,
            rng=seeded_random(3),
            store=store,
            telemetry=False,
        )
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f")

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        if self.redis_clock is not None:
            self.redis_clock.set(self.clock.monotonic())  # type: ignore[attr-defined]

    async def get(self, what: str) -> int:
        return (await self.http.get(f"/{what}", headers={"x-client-id": "c1"})).status_code


async def _credit_run(rig: _CreditRig) -> list[int]:
    rig.advance(0.0)
    calls = [asyncio.ensure_future(rig.get("fail")) for _ in range(4)]
    await _until(lambda: rig.waiting == 4)  # (Redis: real round trips before the app runs)
    assert rig.waiting == 4
    assert await rig.get("ok") == 200  # the bucket is empty now
    rig.advance(1.0)  # refilled while the four waited: their refunds become credit
    rig.release.set()
    assert await asyncio.gather(*calls) == [503] * 4
    assert [await rig.get("ok") for _ in range(5)] == [200] * 5  # the bucket again
    assert await rig.get("limited") == 429  # admitted from credit, then another limit's 429
    assert rig.reasons[-1] == "retry_credit"
    return [await rig.get("ok") for _ in range(5)]


@pytest.mark.anyio
async def test_credit_spent_by_a_request_another_limit_refused_comes_back_memory() -> None:
    """Before: the refund of another limit's 429 earns no credit (right: the client's own
    doing), and so the credit that admission had spent was lost: 3 retries left, not 4."""
    rig = _CreditRig(None, None)
    assert await _credit_run(rig) == [200] * 4 + [429]
    assert rig.reasons[-4:] == ["retry_credit"] * 4


@pytest.mark.anyio
@pytest.mark.redis
async def test_credit_spent_by_a_request_another_limit_refused_comes_back_redis(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """The same through refund.lua, on the pinned Redis clock: the same answers."""
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET))
    try:
        rig = _CreditRig(store, redis_clock)
        assert await _credit_run(rig) == [200] * 4 + [429]
        assert rig.reasons[-4:] == ["retry_credit"] * 4
    finally:
        await store.aclose()


# ---------------------------------------------------------------- 3. units handed back by sync.lua

TIERED = LimitSpec("t", 0.1, 0.8, 1, False)  # 10/s, burst 8


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_tiered_instance_hands_back_after_a_restart_only_the_units_it_held(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Checked, not changed: sync.lua's give-back is not capped at the units still
    outstanding as a refund is, but an instance only ever hands back units it holds
    (leased, or refunded into its slice), at most burst / 4 of a roomy key. After a
    restart (the key gone) the units it held of the old server go to the new one: the
    fleet then admits a burst plus those, exactly what it admits when the instance
    spends them instead, which it may (docs/state.md: "the bound loosens by the units
    already held in slices"). A cap "as refunds are" (the lease's marker) would not
    stop it either: the old lease's marker is still in the future."""
    t = 1_000.0
    clock = FakeClock(t)
    cfg = StateConfig(url="tiered+" + redis_url, sync_interval_ms=100, **PATIENT, **QUIET)
    tiered = TieredStore(config=cfg, rng=lambda: 0.5, clock=clock)
    tiered._last_sync = math.inf  # syncs only when the test says so
    exact = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET))
    try:
        for _ in range(3):
            assert (await tiered.admit(None, None, ["t|k"], [TIERED], t)).admitted
        held = tiered.slices["t|k"].tokens
        assert held > 0
        with redis_sync.Redis.from_url(redis_url) as client:  # a restart: every key gone
            client.flushdb()
        redis_clock.set(t)
        fleet = sum(
            [(await exact.admit(None, None, ["t|k"], [TIERED], t)).admitted for _ in range(12)]
        )
        assert fleet == 8  # a fresh bucket: the burst
        clock.advance(0.2)  # the slice is idle for a sync interval: it is handed back
        await tiered._sync_all(clock.monotonic())
        assert "t|k" not in tiered.slices
        more = sum(
            [(await exact.admit(None, None, ["t|k"], [TIERED], t)).admitted for _ in range(12)]
        )
        assert more == held  # what it held, no more (units of the old server)
    finally:
        await tiered.aclose()
        await exact.aclose()


# ---------------------------------------------------------- 4. memory:// under several workers

MEMORY_POLICY = """\
version = 1

[state]
url = "memory://"

[[rate_limit]]
name = "per-client"
rate = "100/s"
"""


def _policy_file(tmp_path: Path, text: str = MEMORY_POLICY) -> str:
    path = tmp_path / "fidelity.toml"
    path.write_text(text)
    return str(path)


def test_check_warns_about_memory_state_under_several_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `check` passed a memory:// policy whatever the worker count, and the
    service then admitted N times each limit without a word."""
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    name = _policy_file(tmp_path)
    assert main(["check", name]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["check", "--workers", "4", name]) == 0
    out = capsys.readouterr().out
    assert f"{name}:4: warning: state.url: memory:// state under 4 worker processes" in out
    assert "up to 4 x each rate limit" in out
    assert main(["check", "--strict", "--workers", "4", name]) == 1
    capsys.readouterr()
    monkeypatch.setenv("WEB_CONCURRENCY", "3")  # what uvicorn and gunicorn default to
    assert main(["check", "--json", name]) == 0
    (warning,) = json.loads(capsys.readouterr().out)["files"][0]["warnings"]
    assert (warning["path"], warning["line"]) == ("state.url", 4)
    assert "3 worker processes" in warning["message"]
    assert main(["check", "--workers", "1", name]) == 0  # said explicitly: one process
    assert "warning" not in capsys.readouterr().out
    shared = _policy_file(tmp_path, MEMORY_POLICY.replace("memory://", "redis://r:6379/0"))
    assert main(["check", shared]) == 0
    assert "warning" not in capsys.readouterr().out


def test_the_middleware_warns_once_at_startup_under_web_concurrency(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(factory, "_warned_workers", False)
    caplog.set_level(logging.WARNING, "fidelity_mw.state")
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    FidelityMiddleware(_ok, policy=Policy(), telemetry=False)
    assert not caplog.records
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    for _ in range(3):  # one line per process, however many middlewares it builds
        FidelityMiddleware(_ok, policy=Policy(), telemetry=False)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("fidelity_mw: WEB_CONCURRENCY=4: memory:// state under 4 worker")


# ---------------------------------------------------------------- 5. the policy version as a metric


@pytest.mark.anyio
async def test_the_policy_version_is_a_metric_and_follows_the_policy_in_force() -> None:
    """Before: the version was on spans only. `fidelity.policy.info` is read from the
    engines at collection, so a policy put in force (a restart, an engine's new policy)
    shows at the next collection, and no gauge is exported for shared-state fallback
    while only memory state is in use."""
    pipe = pipeline()
    first = Policy(rate_limits=[RateLimit(name="per-client", rate="100/s")])
    app = FidelityMiddleware(
        Starlette(routes=[Route("/x", _ok)]), policy=first, observer=pipe.telemetry
    )
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/x")).status_code == 200
            versions = metric_points(pipe.metrics, "fidelity.policy.info")
            assert [(a, p.value) for a, p in versions] == [
                ({"fidelity.policy.version": first.version}, 1)
            ]
            assert metric_points(pipe.metrics, "fidelity.state.fallback") == []
            second = Policy(rate_limits=[RateLimit(name="per-client", rate="5/s")])
            app.engine.policy = second
            versions = metric_points(pipe.metrics, "fidelity.policy.info")
            assert [a["fidelity.policy.version"] for a, _ in versions] == [second.version]
            assert second.version != first.version
    finally:
        pipe.shutdown()
