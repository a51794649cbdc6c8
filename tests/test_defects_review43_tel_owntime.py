"""benchmarks/telemetry_overhead.py `--own-time`: the middleware's own time is its whole time
less the route's below it and the sends above it (on a stepped clock, never timed), and
`--last-level` hands callgrind the simulated last level it names."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import telemetry_overhead as tel


def test_own_time_leaves_out_the_route_and_the_sends_above(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Middleware 3 before the route + 2 in each of its send wrapper's 2 calls = 7; the
    route's 5 and the outer sends' 11 each are not the middleware's."""
    now = [0]
    monkeypatch.setattr(tel.time, "perf_counter_ns", lambda: now[0])

    async def route(scope: Any, receive: Any, send: Any) -> None:
        now[0] += 5
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    inner = tel.OwnClock(route)

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        now[0] += 3

        async def wrapped(message: Any) -> None:
            now[0] += 2
            await send(message)

        await inner(scope, receive, wrapped)

    outer = tel.OwnClock(middleware)

    async def server_send(message: Any) -> None:
        now[0] += 11

    for _ in range(2):
        asyncio.run(outer({}, None, server_send))
    assert outer.total == [3 + 5 + 2 * (2 + 11)] * 2
    assert tel.own_times(outer, inner) == [7, 7]


def test_last_level_is_passed_to_callgrind(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> None:
        runs.append(argv)
        for arg in argv:
            if arg.startswith("--callgrind-out-file="):
                Path(arg.split("=", 1)[1]).write_text("events: Ir\nsummary: 1\n")

    monkeypatch.setattr(tel.subprocess, "run", run)
    tel.count_events("bare", 10, last_level=1 << 20)
    counted = [argv for argv in runs if argv[0] == "valgrind"]
    assert len(counted) == 2
    for argv in counted:
        assert "--LL=1048576,8,64" in argv
        assert "--cache-sim=yes" in argv
    runs.clear()
    tel.count_events("bare", 10)
    assert not any(a.startswith("--LL=") for argv in runs for a in argv)
