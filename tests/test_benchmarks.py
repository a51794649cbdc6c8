"""The benchmark harnesses measure what they say: counts, /proc readings and paired ratios.

No timings are asserted: the inputs are counted events, this process's own
readings, or made-up samples.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import callcount, server, server_inprocess
from benchmarks.overhead import build_apps

import fidelity_mw


class _Yield:
    def __await__(self):  # type: ignore[no-untyped-def]
        yield


async def _twice() -> int:
    await _Yield()
    await _Yield()
    return 1


def test_profile_tells_calls_from_resumptions() -> None:
    coro = _twice()
    profile = callcount.Profile()
    sys.setprofile(profile)
    try:
        for _ in range(5):
            try:
                coro.send(None)
            except StopIteration:
                break
    finally:
        sys.setprofile(None)
    names = {name.rsplit(" ", 1)[-1]: n for name, n in profile.by_function.items()}
    assert names["_twice"] == 1  # entered once, resumed twice
    assert names["_Yield.__await__"] == 2
    assert profile.calls == 3
    assert profile.resumes == 4  # _twice twice, each __await__ generator once


@pytest.mark.skipif(
    fidelity_mw.compiled, reason="compiled build: its middleware makes no Python calls to count"
)
def test_callcount_is_exact_and_sees_the_middleware() -> None:
    from benchmarks.overhead import fidelity_policy
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    from fidelity_mw import FidelityMiddleware
    from fidelity_mw.testing import FakeClock

    apps = build_apps()
    # On a clock that stands still: the real one crossed breaker-window and budget
    # bucket edges during one run and not the other (a rotation's calls), more of them
    # the longer a starved machine took (840 against 843 calls beside CPU burners).
    apps["fidelity"] = Starlette(
        routes=apps["bare"].routes,
        middleware=[
            Middleware(
                FidelityMiddleware, policy=fidelity_policy(), telemetry=False, clock=FakeClock()
            )
        ],
    )

    async def count(name: str) -> callcount.Profile:
        profile = callcount.Profile()
        await callcount._requests(apps[name], 20, profile)
        return profile

    async def run() -> list[callcount.Profile]:
        for name in ("bare", "fidelity"):
            await callcount._requests(apps[name], 50)  # warm up
        return [await count("bare"), await count("fidelity"), await count("fidelity")]

    # Counts, not samples: the same every time (a path that made calls per request at
    # random never would).
    bare, first, second = asyncio.run(run())
    assert (first.calls, first.c_calls) == (second.calls, second.c_calls)
    assert first.calls > bare.calls
    middleware = [
        n for k, n in first.by_function.items() if k.endswith(" FidelityMiddleware.__call__")
    ]
    assert middleware == [20]  # one entry per request


@pytest.mark.skipif(
    fidelity_mw.compiled, reason="compiled build: its middleware runs no bytecode to count"
)
def test_callcount_counts_bytecodes_by_function() -> None:
    apps = build_apps()

    async def run() -> callcount.Instructions:
        await callcount._requests(apps["fidelity"], 50)  # warm up
        return await callcount._instructions(apps["fidelity"], 10)

    counter = asyncio.run(run())
    by_function = counter.by_function(10)
    assert sum(by_function.values()) == pytest.approx(counter.count / 10)
    middleware = [v for k, v in by_function.items() if k.endswith(" FidelityMiddleware.__call__")]
    assert len(middleware) == 1
    assert middleware[0] > 50


def test_server_inprocess_serves_every_connection_through_uvicorns_protocol() -> None:
    async def run() -> dict[str, server_inprocess.Server]:
        servers = {
            v: server_inprocess.Server(v)
            for v in ("bare", "headers", "fidelity-memory", "fidelity-noheaders")
        }
        for s in servers.values():
            assert await s.run(64) > 0.0
        return servers

    servers = asyncio.run(run())
    for variant, s in servers.items():
        # two batches over 32 connections: every connection answered twice (head, then
        # body: two writes each), kept open
        assert [t.writes for _, t in s.connections] == [4] * server_inprocess.CONNECTIONS
        assert not any(t.closing for _, t in s.connections)
        response = s.connections[0][1].head
        assert response.startswith(b"HTTP/1.1 200 OK\r\n"), variant
        # the stand-in fields are as long as the middleware's own (same serialization work)
        fields = b"ratelimit: " in response and b"ratelimit-policy: " in response
        assert fields == (variant in ("headers", "fidelity-memory")), variant
    own = servers["fidelity-memory"].connections[0][1].head
    stand_in = servers["headers"].connections[0][1].head
    assert len(own.split(b"\r\n")) == len(stand_in.split(b"\r\n"))


def test_server_layer_variants_switch_fidelitys_layers_on_one_at_a_time() -> None:
    async def run() -> dict[str, server_inprocess.Server]:
        servers = {v: server_inprocess.Server(v) for v in sorted(server.LAYER_VARIANTS)}
        for s in servers.values():
            assert await s.run(32) > 0.0
        return servers

    servers = asyncio.run(run())
    for variant, s in servers.items():
        response = s.connections[0][1].head
        assert response.startswith(b"HTTP/1.1 200 OK\r\n"), variant
        assert b"ratelimit" not in response, variant  # no limit: no RateLimit fields
        app = s.connections[0][0].app  # uvicorn's wrapper around the variant's app
        mw = getattr(app, "app", app)
        plan = mw.engine.plan_for({"type": "http", "method": "GET", "path": "/hello"})
        assert not plan.limits, variant
        assert (plan.breaker is not None) == (variant == "fidelity-breaker"), variant
        # (the frame: no default deadline, and no header of the requests' names one)
        assert (plan.deadline_default_s is None) == (variant == "fidelity-frame"), variant
    assert set(server.VARIANTS) >= server.LAYER_VARIANTS


def test_server_inprocess_loopback_carries_every_response_through_the_kernel() -> None:
    loopback = server_inprocess.Loopback()
    carried: list[bytes] = []
    carry = loopback.carry

    def spy(data: bytes) -> None:
        carry(data)  # sent, and read back whole (else the next write's bytes would mix in)
        carried.append(data)

    loopback.carry = spy  # type: ignore[method-assign]

    async def run() -> server_inprocess.Server:
        s = server_inprocess.Server("fidelity-memory", loopback)
        assert await s.run(32) > 0.0
        return s

    try:
        s = asyncio.run(run())
    finally:
        loopback.close()
    # every connection's head and body went through the socket pair, in order
    assert len(carried) == 2 * server_inprocess.CONNECTIONS
    assert sum(t.writes for _, t in s.connections) == len(carried)
    assert carried[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"ratelimit: " in carried[0]
    table = server_inprocess.report({"bare": [1e-5], "fidelity-memory": [2e-5]}, {}, 1, 32, True)
    assert "loopback TCP pair" in table
    assert "no sockets" not in table


def test_server_inprocess_one_variant_run_and_callgrind_totals() -> None:
    # the run a callgrind count wraps: whole batches after the warm-up
    assert server_inprocess.run_one("fidelity-memory", 40) == server_inprocess.CONNECTIONS
    assert server_inprocess.run_one("bare", 0) == 0
    text = "version: 1\ncmd: python\nevents: Ir\nfn=(1) main\n0 5\nsummary: 123456\n"
    assert server_inprocess.callgrind_total(text) == 123456
    assert server_inprocess.callgrind_total("events: Ir\ntotals: 42\n") == 42
    with pytest.raises(ValueError, match="not a callgrind output"):
        server_inprocess.callgrind_total("events: Ir\n")
    table = server_inprocess.report_instructions({"bare": 1000.0, "fidelity-memory": 1500.0}, 64)
    assert "| fidelity-memory | 1,500 | +500 | 1.500 |" in table


def test_cpu_seconds_reads_this_process_from_proc() -> None:
    total = sum(range(2_000_000))  # some CPU time to read
    times = os.times()
    assert total > 0
    assert abs(server.cpu_seconds(os.getpid()) - (times.user + times.system)) < 0.05
    user, system = server.cpu_times(os.getpid())
    assert abs(user - times.user) < 0.05
    assert abs(system - times.system) < 0.05


def test_server_report_shows_the_user_space_share_of_server_cpu() -> None:
    samples = [
        _sample("bare", 0, 10_000, 40, user_us_per_req=25.0),
        _sample("fidelity-memory", 0, 8_000, 50, user_us_per_req=34.0),
    ]
    args = argparse.Namespace(
        connections=[32], variants=["bare", "fidelity-memory"], rounds=1,
        duration=5, warmup=1, server_cpu=0, load_cpu=1, redis_version="7",
    )  # fmt: skip
    text = server.report(samples, args)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 50 (1.25x), user 34 |" in rows["| fidelity-memory"]
    assert "| 40 (1.00x), user 25 |" in rows["| bare"]


def test_redis_connections_counts_sockets_to_that_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert server.redis_connections(os.getpid(), port) == 0
        with socket.create_connection(("127.0.0.1", port)) as one:
            accepted, _ = listener.accept()
            with accepted, socket.create_connection(("127.0.0.1", port)) as two:
                # two client sockets; the accepted one's far end is not the port
                assert server.redis_connections(os.getpid(), port) == 2
                assert one.fileno() != two.fileno()


def _sample(variant: str, rnd: int, rps: float, cpu: float, **kw: object) -> server.Sample:
    fields: dict = {  # type: ignore[type-arg]
        "variant": variant,
        "connections": 32,
        "round": rnd,
        "rps": rps,
        "p99_ms": 5.0,
        "non2xx": 0,
        "socket_errors": 0,
        "error_kinds": {},
        "requests": int(rps * 5),
        "cpu_us_per_req": cpu,
        "redis_cpu_us_per_req": None,
        **kw,
    }
    return server.Sample(**fields)


def test_server_report_pairs_ratios_per_round_and_flags_failures() -> None:
    # round 1 ran at half the speed of round 0 (a busy machine): the paired ratios agree
    samples = [
        _sample("bare", 0, 10_000, 40),
        _sample("fidelity-memory", 0, 9_500, 50),
        _sample("bare", 1, 5_000, 40),
        _sample("fidelity-memory", 1, 4_750, 50),
        _sample(
            "fidelity-redis",
            0,
            2_000,
            200,
            redis_cmds={"evalsha": 1_000, "hmget": 3_000},
            redis_clients=32,
            non2xx=3,
        ),
    ]
    args = argparse.Namespace(
        connections=[32], variants=["bare", "fidelity-memory", "fidelity-redis"], rounds=2,
        duration=5, warmup=1, server_cpu=0, load_cpu=1, redis_version="7",
    )  # fmt: skip
    text = server.report(samples, args)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 0.950 (0.950, 0.950) |" in rows["| fidelity-memory"]
    assert "50 (1.25x) |" in rows["| fidelity-memory"]  # no user-space share measured
    # 4,000 commands over 10,000 requests, a quarter of them script calls
    assert "| 0.40 (0.30 HMGET, 0.10 EVALSHA) | 0.100 | 32 |" in rows["| fidelity-redis"]
    assert "| 3 / 0 |" in rows["| fidelity-redis"]
    assert "- fidelity-memory / bare: 0.95 in req/s, 0.80 from CPU per request" in text
    assert "(goal ≥ 0.9: met)" in text
    assert "over the run: 3 (must be 0" in text


def test_toolkit_inbound_variants_serve_the_route_with_their_fields() -> None:
    from benchmarks._asgi import make_scope, receive

    apps = build_apps(toolkits=True)
    assert {"pyresilience", "fastapi", "fastapi+fidelity", "throttled"} <= set(apps)
    assert "throttled" not in build_apps()  # callcount and compiled keep their variants

    async def one(app: object) -> tuple[int, dict[bytes, bytes]]:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        await app(make_scope(), receive, send)  # type: ignore[operator]
        start = sent[0]
        return start["status"], dict(start["headers"])  # type: ignore[arg-type, return-value]

    for name in ("pyresilience", "fastapi", "fastapi+fidelity", "throttled"):
        status, headers = asyncio.run(one(apps[name]))
        assert status == 200, name
        if name == "throttled":  # its RateLimitMiddleware ran: a limit was checked
            assert b"ratelimit-limit" in headers
        if name == "fastapi+fidelity":
            assert b"ratelimit" in headers


def test_framework_controls_serve_the_route_and_report_fastapi_against_starlette() -> None:
    from benchmarks import overhead
    from benchmarks._asgi import run_batch

    apps = build_apps(frameworks=True)
    controls = [f for _, f in overhead.FRAMEWORK_PAIRS]
    assert set(controls) <= set(apps)
    assert "fastapi+noop" not in build_apps(toolkits=True)  # only with --frameworks
    for name in controls:
        asyncio.run(run_batch(apps[name], 3))  # every one a 200 (else it raises)

    # two rounds, the second at half speed: per-round pairs on each framework's own bare
    samples = {
        "bare": [10e-6, 20e-6],
        "fastapi": [30e-6, 60e-6],
        "fidelity": [12e-6, 24e-6],  # +2 µs, +4 µs
        "fastapi+fidelity": [33e-6, 66e-6],  # +3 µs, +6 µs: 1.5 x each round
        "noop": [10.5e-6, 21e-6],
        "fastapi+noop": [30.5e-6, 61e-6],
    }
    text = overhead.report(samples, 2, 10)
    assert "| fidelity | +3.00 µs | +4.50 µs | 1.50 |" in text
    assert "| noop | +0.75 µs | +0.75 µs | 1.00 |" in text
    assert "| slowapi |" not in text  # (not measured)
    # without the controls (one pair), no table
    assert "FastAPI / Starlette" not in overhead.report(
        {k: samples[k] for k in ("bare", "fastapi", "fidelity", "fastapi+fidelity")}, 2, 10
    )


def test_callcount_compares_the_middleware_on_both_frameworks() -> None:
    row: dict[str, object] = {"calls": 1.0, "c_calls": 1.0, "bytecodes": 10.0, "blocks": 1.0}
    row |= {"resumes": 0.0, "peak_kib": 1.0, "retained": 0.0}
    row |= {"by_function": {}, "bytecodes_by_function": {}}
    more = {**row, "calls": 3.0, "bytecodes": 30.0}
    results = {"bare": row, "fidelity": more, "fastapi": row, "fastapi+fidelity": more}
    text = callcount.report(results, 10, "fidelity", 5)
    assert "- fidelity minus bare: +2.0 Python calls, +0.0 C calls, +20 bytecodes" in text
    assert "- fastapi+fidelity minus fastapi: +2.0 Python calls" in text


def test_toolkit_outbound_variants_retry_and_break_like_the_default_policy() -> None:
    import httpx
    import nopanic.testing
    from benchmarks.outbound import competitors

    attempts: dict[str, int] = {}

    def send(name: str):  # type: ignore[no-untyped-def]
        attempts[name] = 0

        def upstream(request: httpx.Request) -> httpx.Response:
            attempts[name] += 1
            return httpx.Response(503)

        client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        return lambda: client.get("http://upstream.internal/items/1")

    calls = competitors(send)
    assert set(calls) == {"nopanic", "pyresilience", "pybreaker"}

    async def outcome(name: str) -> object:
        try:
            return (await calls[name]()).status_code
        except httpx.HTTPStatusError as exc:
            return type(exc).__name__

    with nopanic.testing.instant():
        assert asyncio.run(outcome("nopanic")) == "HTTPStatusError"
    assert asyncio.run(outcome("pybreaker")) == "HTTPStatusError"
    # nopanic: 3 attempts (its waits skipped by its own test helper); pybreaker does not
    # retry. pyresilience is not called: it offers no way to skip its backoff's sleeps.
    assert attempts == {"nopanic": 3, "pyresilience": 0, "pybreaker": 1}


def test_server_where_reads_perf_and_strace_summaries_and_reports_paired() -> None:
    from benchmarks import server_where

    perf = (
        "# started on Sun Dec  6 19:00:00 2026\n\n"
        "40577,,sched:sched_wakeup,4001,100.00,,\n"
        "690,,sched:sched_switch,4001,100.00,,\n"
        "122955,,raw_syscalls:sys_enter,4001,100.00,,\n"
    )
    assert server_where.parse_perf_stat(perf) == {
        "sched:sched_wakeup": 40577,
        "sched:sched_switch": 690,
        "raw_syscalls:sys_enter": 122955,
    }
    strace = (
        "% time     seconds  usecs/call     calls    errors syscall\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        " 88.10    0.344024           9     36970         5 write\n"
        " 10.11    0.039464           2     18497           read\n"
        "  1.78    0.006969          11       626           epoll_pwait\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        "100.00    0.390506           6     56121         5 total\n"
    )
    assert server_where.parse_strace_summary(strace) == {
        "write": 36970,
        "read": 18497,
        "epoll_pwait": 626,
    }
    times = {
        "bare": {"user": [30.0, 32.0], "kernel": [20.0, 22.0], "kernel_polling": [12.0, 13.0]},
        "fidelity-memory": {
            "user": [45.0, 49.0],
            "kernel": [22.0, 25.0],
            "kernel_polling": [13.0, 15.0],
        },
    }
    counts = {
        v: {"sched_wakeup": 0.9, "sched_switch": 0.02, "sys_enter": 3.0, "gc_per_1k": [0, 0, 0]}
        for v in times
    }
    counts["bare"]["syscalls"] = {"write": 2.0, "read": 1.0, "epoll_pwait": 0.001}
    table = server_where.report(list(times), times, counts, {"bare": 1e5, "fidelity-memory": 1.5e5})
    # the differences to bare are paired per round: medians of (+15, +17) and (+2, +3)
    assert "| fidelity-memory | 47.0 (+16.0) | 23.5 (+2.5) | 14.0 (+1.5) |" in table
    assert "0.90 / 0.020 / 3.00" in table
    assert "150,000 (+50,000)" in table
    assert "- bare: write 2.00, read 1.00" in table
    assert "epoll_pwait" not in table
