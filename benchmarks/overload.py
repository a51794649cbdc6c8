"""Overload: a CPU-bound service offered 1x, 2x and 4x its capacity, with and without a bulkhead.

The service (one uvicorn worker, pinned to one core) answers GET /work by
awaiting a short simulated I/O wait and then burning `--cpu-ms` of CPU, so
requests in flight share the core and each one's latency grows with their
number. The load generator (pinned to the other core) sends requests at a
fixed rate whatever the answers (open loop), each with a `--timeout-s` client
timeout, so an overloaded service shows up as growing latency and timeouts,
not as a politely slower client.

Variants, measured in alternating order at each offered rate:
  none       no limiter: every request is admitted
  fixed      FidelityMiddleware with a fixed bulkhead ([concurrency] limit = --fixed-limit)
  adaptive   FidelityMiddleware with the adaptive limit ([concurrency] adaptive = true)

Per measurement: goodput (200s per second, and as a share of capacity), p50
and p99 latency of the 200s, the shed share (503s), and timeouts/errors.
Capacity is measured first: the 200s per second of a closed loop that keeps
the service busy; the unloaded p99 with one request at a time.

    .venv/bin/python benchmarks/overload.py [--cpu-ms 8] [--duration 6] [--rounds 1]
        [--multiples 1,2,4] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import stamp, write_section

VARIANTS = ("none", "fixed", "adaptive")

APP_SOURCE = """
import asyncio, os, time
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

CPU_S = float(os.environ["OVERLOAD_CPU_MS"]) / 1000.0
IO_S = float(os.environ["OVERLOAD_IO_MS"]) / 1000.0

async def work(request):
    await asyncio.sleep(IO_S)
    end = time.perf_counter() + CPU_S
    while time.perf_counter() < end:
        pass
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/work", work)])
variant = os.environ["OVERLOAD_VARIANT"]
if variant != "none":
    from fidelity_mw import FidelityMiddleware, Policy
    from fidelity_mw.policy import ConcurrencyConfig

    if variant == "fixed":
        conc = ConcurrencyConfig(limit=int(os.environ["OVERLOAD_FIXED_LIMIT"]))
    else:
        conc = ConcurrencyConfig(limit=4, adaptive=True, max_limit=500)
    policy = Policy(concurrency=conc, breaker=None, rate_limits=())
    app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)
"""


@dataclass
class Result:
    variant: str
    multiple: float
    offered: float
    sent: int = 0
    ok: int = 0
    shed: int = 0
    failed: int = 0
    latencies_ok: list[float] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def goodput(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ok:
            return float("nan")
        data = sorted(self.latencies_ok)
        return data[min(len(data) - 1, int(q * len(data)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(core: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core)]
    return []


@contextlib.contextmanager
def serve(variant: str, args: argparse.Namespace, app_dir: Path) -> Iterator[str]:
    port = _free_port()
    env = dict(
        os.environ,
        OVERLOAD_VARIANT=variant,
        OVERLOAD_CPU_MS=str(args.cpu_ms),
        OVERLOAD_IO_MS=str(args.io_ms),
        OVERLOAD_FIXED_LIMIT=str(args.fixed_limit),
        PYTHONPATH=f"{app_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    cmd = [
        *_pin(0),
        sys.executable,
        "-m",
        "uvicorn",
        "overload_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--backlog",
        "4096",
    ]
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(base + "/work", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{variant}: server did not start") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


async def _one(client: httpx.AsyncClient, url: str, res: Result, timeout_s: float) -> None:
    start = time.perf_counter()
    try:
        # a total time limit: httpx's own timeouts are per phase
        resp = await asyncio.wait_for(client.get(url), timeout_s)
    except (httpx.HTTPError, TimeoutError):
        res.failed += 1
        return
    if resp.status_code == 200:
        res.ok += 1
        res.latencies_ok.append(time.perf_counter() - start)
    elif resp.status_code == 503:
        res.shed += 1
    else:
        res.failed += 1


async def open_loop(
    base: str, rate: float, duration_s: float, timeout_s: float, res: Result
) -> None:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        n = int(rate * duration_s)
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, base + "/work", res, timeout_s)))
        res.sent = n
        await asyncio.gather(*tasks)
        res.duration_s = duration_s


async def closed_loop(base: str, workers: int, duration_s: float) -> Result:
    res = Result("calibration", 0, 0)
    async with httpx.AsyncClient() as client:
        stop = time.perf_counter() + duration_s

        async def worker() -> None:
            while time.perf_counter() < stop:
                await _one(client, base + "/work", res, 10.0)

        await asyncio.gather(*(worker() for _ in range(workers)))
    res.duration_s = duration_s
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-ms", type=float, default=8.0)
    parser.add_argument("--io-ms", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--timeout-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--multiples", default="1,2,4")
    parser.add_argument("--fixed-limit", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    multiples = [float(m) for m in args.multiples.split(",")]

    app_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fidelity-overload-{os.getpid()}"
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "overload_app.py").write_text(APP_SOURCE)
    if _pin(1):
        os.sched_setaffinity(0, {1})

    with serve("none", args, app_dir) as base:
        cal = asyncio.run(closed_loop(base, 8, max(3.0, args.duration / 2)))
        one = asyncio.run(closed_loop(base, 1, max(3.0, args.duration / 2)))
    capacity = cal.goodput
    unloaded_p99 = one.pct(0.99)
    print(
        f"capacity {capacity:.0f} req/s, unloaded p50 {one.pct(0.5) * 1000:.1f} ms, "
        f"p99 {unloaded_p99 * 1000:.1f} ms",
        file=sys.stderr,
    )

    results: list[Result] = []
    for rnd in range(args.rounds):
        for multiple in multiples:
            order = VARIANTS if (rnd + int(multiple)) % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                res = Result(variant, multiple, capacity * multiple)
                with serve(variant, args, app_dir) as base:
                    asyncio.run(open_loop(base, res.offered, args.duration, args.timeout_s, res))
                print(
                    f"{variant:9} x{multiple:g}: goodput {res.goodput:.0f}/s "
                    f"({res.goodput / capacity:.0%}), p50 {res.pct(0.5) * 1000:.0f} ms, "
                    f"p99 {res.pct(0.99) * 1000:.0f} ms, shed {res.shed}, failed {res.failed}",
                    file=sys.stderr,
                )
                results.append(res)

    lines = [
        stamp(),
        "",
        f"Service: one uvicorn worker pinned to core 0; each request awaits {args.io_ms:g} ms "
        f"then burns {args.cpu_ms:g} ms of CPU. Open-loop load from the other core, "
        f"{args.duration:g} s per measurement, client timeout {args.timeout_s:g} s; "
        f"{args.rounds} round(s), variants in alternating order. Capacity (closed loop, "
        f"8 clients): **{capacity:.0f} req/s**; unloaded p99 (one at a time): "
        f"**{unloaded_p99 * 1000:.1f} ms**. Fixed bulkhead: limit {args.fixed_limit}.",
        "",
        "| offered | variant | goodput | of capacity | p50 (200s) | p99 (200s) | p99 / unloaded "
        "p99 | shed (503) | timeouts/errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for multiple in multiples:
        for variant in VARIANTS:
            runs = [r for r in results if r.variant == variant and r.multiple == multiple]
            if not runs:
                continue
            good = statistics.median(r.goodput for r in runs)
            p50 = statistics.median(r.pct(0.5) for r in runs)
            p99 = statistics.median(r.pct(0.99) for r in runs)
            shed = statistics.median(r.shed / max(1, r.sent) for r in runs)
            failed = statistics.median(r.failed / max(1, r.sent) for r in runs)
            lines.append(
                f"| {multiple:g}x | {variant} | {good:.0f}/s | {good / capacity:.0%} | "
                f"{p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms | {p99 / unloaded_p99:.1f}x | "
                f"{shed:.0%} | {failed:.0%} |"
            )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Overload: bulkheads at 1x, 2x and 4x capacity (`overload.py`)", body)


if __name__ == "__main__":
    main()
