"""Regression tests for defects confirmed by the third review pass: each failed on
the code before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import json
import logging
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from fidelity_mw import FidelityMiddleware, FidelityTransport
from fidelity_mw.decide.breaker import FAILURE, SUCCESS
from fidelity_mw.engine import Engine
from fidelity_mw.errors import CircuitOpen, PolicyError
from fidelity_mw.policy import (
    BreakerConfig,
    Policy,
    RateLimit,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from fidelity_mw.tools.cli import main as cli_main
from redis_server import PATIENT, QUIET, RedisServer


class _LossyProxy:
    """A TCP proxy in front of a real Redis that, when armed, lets the next command
    through and then resets the client's connection instead of passing the reply on:
    Redis applied the command, its answer never arrives."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = parts.path
        self.armed = False
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> _LossyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()  # each connection's pumps then end by themselves
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}{self.db}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers |= {writer, up_writer}

        async def pump_up() -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.transport.abort()

        up = asyncio.create_task(pump_up())
        self._tasks.add(up)
        try:
            while data := await up_reader.read(65536):
                if self.armed:
                    self.armed = False
                    self.dropped += 1
                    break  # Redis answered; the client sees a reset instead
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            up_writer.transport.abort()


# no refill during the test: every charge stays visible in `remaining`
_BUCKET = LimitSpec("l", 1_000.0, 10_000.0, 1, False)


@pytest.mark.anyio
@pytest.mark.parametrize("n", [1, 3])  # one admission alone, and a coalesced batch
async def test_redis_reply_lost_after_the_call_was_sent_is_not_resent(
    redis_url: str, n: int
) -> None:
    async with _LossyProxy(redis_url) as proxy:
        config = StateConfig(url=proxy.url, **PATIENT, **QUIET)  # type: ignore[arg-type]
        store = RedisStore(config=config, rng=seeded_random(7))
        keys = [f"review3:lost:{n}:{i}:{time.monotonic_ns()}" for i in range(n)]
        try:
            # the same call once before: its script is loaded (no NOSCRIPT reply to lose)
            # and a pooled connection exists
            warm = await asyncio.gather(
                *(store.admit(None, None, [key + ":warm"], [_BUCKET], 0.0) for key in keys)
            )
            assert [r.source for r in warm] == ["redis"] * n
            # the store's one background read after its first answer (the eviction policy,
            # `_check_eviction`) is done first: armed while it ran, the proxy dropped its
            # reply instead of the admissions' (all three then answered from Redis)
            if store._eviction_task is not None:
                await store._eviction_task
            proxy.armed = True
            lost = await asyncio.gather(
                *(store.admit(None, None, [key], [_BUCKET], 0.0) for key in keys)
            )
            assert proxy.dropped == 1
            # the degrade path answered them: nothing was sent a second time
            assert [r.source for r in lost] == ["fallback"] * n
            assert store.stats.fallbacks == n
            after = await asyncio.gather(
                *(store.admit(None, None, [key], [_BUCKET], 0.0) for key in keys)
            )
        finally:
            await store.aclose()
    assert [r.source for r in after] == ["redis"] * n
    # Redis applied the lost call once (10 - 1), then this one: 8 left, not 7
    assert [r.limits[0].remaining for r in after] == [8] * n


# ------------------------------ tiered: outcomes a sync with a bad reply carried


@pytest.mark.anyio
@pytest.mark.parametrize("reply", [[], [b"?"], b"not a list", [1, b"open"]])
async def test_tiered_outcomes_of_a_sync_with_a_bad_reply_are_counted(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, reply: Any
) -> None:
    """A sync that reached Redis but whose reply could not be read left the breaker
    outcomes it carried neither kept nor counted in `dropped_records` (a failed sync
    counts them)."""
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)  # type: ignore[arg-type]
    store = TieredStore(config=config, rng=seeded_random(5), clock=clock)
    store._last_sync = math.inf  # no background syncs: the test runs them
    breaker = BreakerConfig(min_calls=100)
    route = f"route:review3:{time.monotonic_ns()}"
    try:
        gate, _source, _age = await store.breaker_gate(route, breaker, clock.monotonic())
        assert gate.epoch >= 0  # a gate of the cache, as Redis last said
        for outcome in (FAILURE, FAILURE, SUCCESS):
            store.record_now(route, breaker, gate, outcome, False, clock.monotonic())
        before = store.exact.stats.dropped_records
        errors = store.exact.stats.errors
        real = store.exact.call

        async def garbled(script: Any, keys: Any, args: Any) -> tuple[Any, float] | None:
            got = await real(script, keys, args)  # Redis applies it; the reply is bad
            assert got is not None
            return reply, got[1]

        monkeypatch.setattr(store.exact, "call", garbled)
        clock.advance(1.0)
        await store._sync_all(clock.monotonic())
        assert store.exact.stats.errors == errors + 1
        assert store.exact.stats.dropped_records - before == 3
    finally:
        await store.aclose()


# ------------------------------------------------ policy: a negative burst, plainly


@pytest.mark.parametrize("burst", [-1, 0])
def test_an_out_of_range_burst_is_the_bursts_error_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], burst: int
) -> None:
    """`burst = -1` also blamed the cost ("cost 1 exceeds burst -1"), on the table's line,
    and printed that before the burst's own error."""
    path = tmp_path / "p.toml"
    path.write_text(f'version = 1\n[[rate_limit]]\nname = "x"\nrate = "10/s"\nburst = {burst}\n')
    with pytest.raises(PolicyError) as caught:
        Policy.from_toml(path)
    assert [issue.path for issue in caught.value.issues] == ["rate_limit[0].burst"]
    assert cli_main(["check", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:5: rate_limit[0].burst: {burst} is out of range: allowed between 1 and 1000000000",
        f"{path}: 1 error(s)",
    ]


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"concurrency": {"adaptive": True, "max_limit": -1}}, "concurrency.max_limit"),
        ({"concurrency": {"default_share": -0.5}}, "concurrency.default_share"),
        ({"upstream": [{"host": "*", "retry": {"max_ms": -1}}]}, "upstream[0].retry.max_ms"),
    ],
)
def test_an_out_of_range_value_is_not_also_blamed_on_its_neighbours(
    table: dict[str, Any], expected: str
) -> None:
    """max_limit = -1 also gave "min_limit: must not exceed max_limit" and "limit: the
    adaptive limit starts between ..."; default_share = -0.5 also blamed sheddable_share."""
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(table)
    assert [issue.path for issue in caught.value.issues] == [expected]


# ---------------------------------- `fidelity-mw check`: each path's problem, then on


def test_check_reports_every_path_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing first file ended the run (exit 2) before the others were checked, and a
    directory was called "no such file"."""
    missing = tmp_path / "missing.toml"
    folder = tmp_path / "policies"
    folder.mkdir()
    good = tmp_path / "good.toml"
    good.write_text("version = 1\n")
    assert cli_main(["check", str(missing), str(folder), str(good)]) == 1
    out = capsys.readouterr().out
    assert f"{missing}: no such file\n{missing}: 1 error(s)\n" in out
    assert f"{folder}: is a directory, not a policy file\n{folder}: 1 error(s)\n" in out
    assert f"{good}: ok" in out
    assert cli_main(["check", "--json", str(missing), str(good)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [(f["file"], f["ok"]) for f in doc["files"]] == [
        (str(missing), False),
        (str(good), True),
    ]
    assert doc["files"][0]["errors"][0]["message"] == "no such file"


# ------------------------------- outbound: a day-long upstream Retry-After, passed on


def _front(clock: FakeClock, upstream_retry_after: str, retry: RetryConfig) -> Any:
    """A route that calls a plain upstream answering 503 with `upstream_retry_after`
    and answers 503 itself when that call fails."""
    engine = Engine(
        Policy(upstreams=(UpstreamConfig(host="plain", retry=retry, breaker=None),)),
        clock=clock,
        rng=seeded_random(7),
    )

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"retry-after": upstream_retry_after})

    transport = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    http = httpx.AsyncClient(transport=transport)

    async def work(request: Request) -> Response:
        got = await http.get("http://plain/pay")
        return JSONResponse({"upstream": got.status_code}, 503)

    app = Router(routes=[Route("/work", work)])
    return FidelityMiddleware(app, engine=engine, telemetry=False)


def _http_date(wall: float) -> str:
    return email.utils.formatdate(wall, usegmt=True)


@pytest.mark.anyio
@pytest.mark.parametrize("day", ["86400", "date"])
@pytest.mark.parametrize("spread", [0.0, 0.5])
async def test_a_huge_upstream_retry_after_is_capped_in_the_advice(day: str, spread: float) -> None:
    """The upstream's Retry-After (a day; or an HTTP date a day away) went to our caller
    as it was, plus half of it again as spread: every client told to stay away for up
    to a day and a half. Our own wait gives up at once (`retry_after_max_s`)."""
    clock = FakeClock()
    value = "86400" if day == "86400" else _http_date(clock.wall() + 86_400.0)
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2, advice_spread=spread)
    front = _front(clock, value, retry)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=front), base_url="http://front"
    ) as client:
        response = await client.get("/work")
    assert response.status_code == 503
    assert clock.sleeps == []  # never waited for it
    advised = response.headers["retry-after"]
    assert advised.isdigit()
    cap = retry.advice_max_s
    assert cap < 86_400
    assert cap <= int(advised) <= math.ceil(cap * (1.0 + spread))


# ---------------------------------------------- inbound: a CORS preflight costs nothing


def _limited_app(calls: list[str]) -> FidelityMiddleware:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["method"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    policy = Policy(rate_limits=(RateLimit(name="per-client", rate="2/min", burst=2),))
    return FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)


PREFLIGHT = {"origin": "https://app.example", "access-control-request-method": "POST"}


@pytest.mark.anyio
async def test_a_cors_preflight_spends_no_quota_and_is_never_refused() -> None:
    """Browsers send a preflight before each cross-origin call; it cost the client a
    token, so half of a browser client's quota went to OPTIONS, and a preflight refused
    with 429 reaches the page as a CORS failure (its Retry-After unreadable)."""
    calls: list[str] = []
    app = _limited_app(calls)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as client:
        for _ in range(3):
            preflight = await client.options("/api/orders", headers=PREFLIGHT)
            assert preflight.status_code == 204
            assert "ratelimit" not in preflight.headers
        first = await client.post("/api/orders")
        second = await client.post("/api/orders")
        third = await client.post("/api/orders")
        # a plain OPTIONS (no preflight headers) is an ordinary request: charged
        plain = await client.options("/api/orders")
    assert [first.status_code, second.status_code, third.status_code] == [204, 204, 429]
    assert plain.status_code == 429
    assert calls == ["OPTIONS"] * 3 + ["POST"] * 2


@pytest.mark.anyio
async def test_a_limit_that_names_options_still_counts_preflights() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit = RateLimit(name="options", rate="1/min", burst=1, methods=("OPTIONS",))
    front = FidelityMiddleware(
        app, policy=Policy(rate_limits=(limit,)), clock=FakeClock(), telemetry=False
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=front), base_url="http://api"
    ) as client:
        statuses = [(await client.options("/x", headers=PREFLIGHT)).status_code for _ in range(2)]
    assert statuses == [204, 429]


# ----------------------- outbound: an attempt's coroutine finalised in another context


class _ParkedTransport(httpx.AsyncBaseTransport):
    """An upstream that never answers: the attempt waits on `parked`."""

    def __init__(self, parked: asyncio.Future[None]) -> None:
        self.parked = parked

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await self.parked
        return httpx.Response(200)


@pytest.mark.anyio
@pytest.mark.parametrize("attempts", [1, 2])  # the first attempt's fast path, and the loop
async def test_a_traced_attempt_closed_in_another_context_logs_nothing(
    caplog: pytest.LogCaptureFixture, attempts: int
) -> None:
    """A dropped call's coroutine, finalised in another context (the garbage collector
    runs it wherever it is): detaching the attempt span's OpenTelemetry context there
    went through `otel_context.detach`, which logged "Failed to detach context" with a
    traceback (the inbound side already detached quietly)."""
    parked = asyncio.get_running_loop().create_future()
    engine = Engine(
        Policy(upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=attempts)),)),
        clock=FakeClock(),
        rng=seeded_random(3),
    )
    transport = FidelityTransport(
        _ParkedTransport(parked), engine=engine, tracer_provider=TracerProvider()
    )
    request = httpx.Request("GET", "http://up.example/x")
    coro = transport.handle_async_request(request)
    contextvars.copy_context().run(coro.send, None)  # the call ran in its own context
    with caplog.at_level(logging.WARNING):
        coro.close()  # finalised here, in another one
    parked.cancel()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_no_private_opentelemetry_names_anywhere_but_the_startup_configurator() -> None:
    """tests/test_telemetry.py checks three telemetry modules; every module of the
    package is held to it, but `configure_otel`'s (it runs the SDK's own configurator,
    once, at startup)."""
    import re

    import fidelity_mw

    private = re.compile(
        r"\b(?:trace_api|metrics_api|otel_context|propagate|opentelemetry[\w.]*)\._\w"
        r"|from opentelemetry[\w.]* import .*\b_\w"
        r"|_internal\b|\._add_event\b|_SUPPRESS\w*_KEY|_ProxyMeterProvider"
    )
    root = Path(fidelity_mw.__file__).parent
    hits = [
        f"{path.relative_to(root)}: {line.strip()}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "otel_setup.py"
        for line in path.read_text().splitlines()
        if private.search(line)
    ]
    assert hits == []


# ------------------- redis: deferred breaker successes lost with the call that carried them


@pytest.mark.anyio
@pytest.mark.parametrize("carrier", ["admit", "record", "flush", "outbound"])
async def test_redis_deferred_successes_lost_with_a_failed_call_are_counted(
    own_redis: RedisServer, carrier: str
) -> None:
    """Plain successes wait for this instance's next call about the breaker; when that
    call failed they were gone without a trace in `dropped_records` (a failed record
    counted only its own outcome)."""
    # no background flush during the test: the deferred successes wait for a carrier
    config = StateConfig(url=own_redis.url, sync_interval_ms=60_000, **PATIENT, **QUIET)  # type: ignore[arg-type]
    store = RedisStore(config=config, rng=seeded_random(5))
    breaker = BreakerConfig(min_calls=100)
    key = "upstream:up.example" if carrier == "outbound" else "route:r"
    try:
        if carrier == "outbound":
            gate, source, _age = await store.breaker_gate(key, breaker, 0.0)
        else:
            result = await store.admit(key, breaker, [], [], 0.0)
            assert result.gate is not None
            gate, source = result.gate, result.source
        assert source == "redis"
        for _ in range(3):
            await store.record(key, breaker, gate, SUCCESS, False, 0.0)
        assert store.stats.dropped_records == 0
        own_redis.stop()
        own = 0
        if carrier == "admit":
            await store.admit(key, breaker, [], [], 0.0)
        elif carrier == "record":
            await store.record(key, breaker, gate, FAILURE, False, 0.0)
            own = 1  # the failure itself
        elif carrier == "flush":
            await store._flush_deferred_now()
        else:
            await store.breaker_gate(key, breaker, 0.0)
        assert store.stats.dropped_records == 3 + own
    finally:
        await store.aclose()


# --------------------------- inbound: a CircuitOpen the app raised with an odd wait


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("wait", "header"),
    # no wait at all is still "1": a refusal never says "come back at once" (review 27)
    [(math.inf, "31536000"), (1e300, "31536000"), (math.nan, "1"), (-5.0, "1"), (2.5, "3")],
)
async def test_our_retry_after_is_whole_seconds_for_any_wait(wait: float, header: str) -> None:
    """An infinite wait made our answer a 500 (OverflowError while formatting it), and
    1e300 became a 301-digit header."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise CircuitOpen("open", host="up.example", retry_after_s=wait)

    front = FidelityMiddleware(app, policy=Policy(), clock=FakeClock(), telemetry=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=front, raise_app_exceptions=False),
        base_url="http://api",
    ) as client:
        response = await client.get("/x")
    assert response.status_code == 503
    assert response.headers["retry-after"] == header
