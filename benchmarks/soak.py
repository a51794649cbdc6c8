"""Soak: a real service under steady load and periodic faults, watched for growth.

    .venv/bin/python benchmarks/soak.py                 # about 5 minutes
    .venv/bin/python benchmarks/soak.py --duration 60   # shorter

Three parts, all on 127.0.0.1:

- **service** (its own process, uvicorn): a Starlette app behind
  FidelityMiddleware (rate limits keyed by a rotating API key, route
  breaker, deadline) whose routes call the upstream through FidelityTransport
  (retries, budget, host breaker, 200 ms attempt timeout). State in Redis
  (`redis://`, on_error=local) when `redis-server` is on PATH, else memory.
  `/_stats` reports its RSS (/proc/self/status), open fds, asyncio tasks,
  key-table size and decision counts.
- **upstream** (a thread here): a raw asyncio HTTP server that, on a 60 s
  cycle, answers normally, flaps between 503 and 200, hangs past the attempt
  timeout, resets connections and refuses them.
- **Redis faults** on the same cycle: paused (SIGSTOP) for 2 s, killed and
  restarted 2 s later.

The load (steady rate, a fixed number of clients) measures latency per
request; every `--sample` seconds the script records latency percentiles,
outcome counts and the service's RSS. At the end: benchmarks/soak.png and the
"## Soak" section of benchmarks/RESULTS.md, with a plain statement of whether
memory or latency grew, comparing like with like: the same point (RSS) and the
same quiet part (latency) of each 60 s fault cycle, the first cycle being
warm-up.

Invariants checked and reported: every request got exactly one response, no
500, no POST reached the upstream twice.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmarks._results import stamp, write_section

HOST = "127.0.0.1"
CYCLE_S = 60.0
# (start, end, what) within each 60 s cycle
UPSTREAM_FAULTS = [
    (10.0, 16.0, "flap"),  # 503 / 200 every 0.5 s
    (22.0, 26.0, "hang"),  # never answers: attempt timeouts
    (32.0, 35.0, "reset"),  # RST after reading the request
    (41.0, 44.0, "down"),  # connection refused
]
REDIS_FAULTS = [
    (5.0, 7.0, "redis paused"),
    (48.0, 50.0, "redis killed"),
]
PNG = Path(__file__).with_name("soak.png")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def phase_at(t: float, table: list[tuple[float, float, str]]) -> str | None:
    offset = t % CYCLE_S
    for start, end, what in table:
        if start <= offset < end:
            return what
    return None


# ---------------------------------------------------------------- the service (child process)


def serve(port: int, upstream: str, state_url: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from fidelity_mw import (
        BreakerConfig,
        DeadlineConfig,
        FidelityMiddleware,
        FidelityTransport,
        Policy,
        RateLimit,
        RetryConfig,
        UpstreamConfig,
    )
    from fidelity_mw.errors import CircuitOpen, DeadlineExceeded
    from fidelity_mw.policy import StateConfig

    counts: collections.Counter[str] = collections.Counter()

    class Counting:
        """Decision counts by layer, verdict and state source (no tracing)."""

        def start(self, ctx: Any, scope: Any) -> None:
            return None

        def end(self, ctx: Any, scope: Any, token: Any) -> None:
            for d in ctx.decisions:
                counts[f"{d.layer}/{d.verdict}/{d.state_source}"] += 1
            counts[f"outcome/{ctx.outcome}"] += 1

    policy = Policy(
        state=StateConfig(
            url=state_url, timeout_ms=100, connect_timeout_ms=100, on_error="local", max_keys=2_000
        ),
        deadline=DeadlineConfig(default_ms=2_000),
        rate_limits=(
            RateLimit(
                name="per-key", rate="20/s", burst=40, key="header:x-api-key", match="/api/*"
            ),
            RateLimit(name="global", rate="2000/s", burst=2000, key="global", match="/api/*"),
        ),
        breaker=BreakerConfig(min_calls=20, failure_ratio=0.5, window_s=10, open_s=2.0),
        upstreams=(
            UpstreamConfig(
                host=HOST,
                retry=RetryConfig(attempts=3, base_ms=20, max_ms=200),
                breaker=BreakerConfig(min_calls=10, failure_ratio=0.5, window_s=10, open_s=2.0),
                attempt_timeout_ms=200,
            ),
        ),
    )
    holder: dict[str, httpx.AsyncClient] = {}

    def client() -> httpx.AsyncClient:
        if "c" not in holder:
            holder["c"] = httpx.AsyncClient(transport=FidelityTransport(telemetry=False))
        return holder["c"]

    async def forward(method: str, path: str, req_id: str | None) -> Response:
        headers = {"x-req-id": req_id} if req_id else {}
        try:
            r = await client().request(method, upstream + path, headers=headers)
            return PlainTextResponse(r.text, status_code=r.status_code)
        except CircuitOpen:
            return PlainTextResponse("upstream breaker open", status_code=503)
        except DeadlineExceeded:
            return PlainTextResponse("deadline", status_code=504)
        except httpx.HTTPError:
            return PlainTextResponse("bad gateway", status_code=502)

    async def items(request: Request) -> Response:
        return await forward("GET", "/items", request.headers.get("x-req-id"))

    async def pay(request: Request) -> Response:
        await request.body()
        return await forward("POST", "/pay", request.headers.get("x-req-id"))

    async def local(request: Request) -> Response:
        return PlainTextResponse("local")

    def rss_bytes() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    async def stats(request: Request) -> Response:
        rss = rss_bytes()
        store = mw.engine.store
        local_store = getattr(store, "local", store)
        table = getattr(local_store, "limits", None)
        return JSONResponse(
            {
                "rss": rss,
                "fds": len(os.listdir("/proc/self/fd")),
                "tasks": len(asyncio.all_tasks()),
                "keys": len(table.tats) if table is not None else None,
                "counts": dict(counts),
            }
        )

    app = Starlette(
        routes=[
            Route("/api/items", items),
            Route("/api/pay", pay, methods=["POST"]),
            Route("/api/local", local),
            Route("/_stats", stats),
        ]
    )
    mw = FidelityMiddleware(app, policy=policy, observer=Counting())
    uvicorn.run(mw, host=HOST, port=port, log_level="warning", access_log=False, lifespan="off")


# ---------------------------------------------------------------- the upstream (thread)


class Upstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "ok"
        self.flap_on = False
        self.post_ids: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._run(self._listen())

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _listen(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(
                self._handle, HOST, self.port, reuse_address=True
            )

    async def _unlisten(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()

    def set_mode(self, mode: str) -> None:
        if mode == "down":
            self._run(self._unlisten())
        else:
            self._run(self._listen())
        self.mode = mode

    def close(self) -> None:
        self._run(self._unlisten())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method = lines[0].split(" ")[0]
                headers = {}
                for line in lines[1:]:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                if method == "POST" and "x-req-id" in headers:
                    self.post_ids[headers["x-req-id"]] += 1
                mode = self.mode
                if mode == "hang":
                    await asyncio.sleep(5)
                    writer.transport.abort()
                    return
                if mode == "reset":
                    sock = writer.get_extra_info("socket")
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    writer.transport.abort()
                    return
                status = 503 if mode == "flap" and self.flap_on else 200
                body = b"ok" if status == 200 else b"down"
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            self.writers.discard(writer)
            writer.transport.abort()


# ---------------------------------------------------------------- Redis (optional)


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server is not None
        self.proc = subprocess.Popen(
            [
                server,
                *("--port", str(self.port), "--bind", HOST),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def dbsize(self) -> int | None:
        """Keys in Redis (DBSIZE over a raw socket), None while it is down or paused."""
        try:
            with socket.create_connection((HOST, self.port), 0.2) as sock:
                sock.settimeout(0.2)
                sock.sendall(b"*1\r\n$6\r\nDBSIZE\r\n")
                reply = sock.recv(64)
            return int(reply[1:].split(b"\r\n")[0]) if reply.startswith(b":") else None
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def pause(self, on: bool) -> None:
        if self.proc is not None and self.paused != on:
            self.proc.send_signal(signal.SIGSTOP if on else signal.SIGCONT)
            self.paused = on

    def stop(self) -> None:
        self.pause(False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# ---------------------------------------------------------------- the run


class Sample:
    def __init__(self, t: float) -> None:
        self.t = t
        self.latencies: list[float] = []
        self.statuses: collections.Counter[str] = collections.Counter()
        self.stats: dict[str, Any] = {}


async def run_load(
    base: str,
    duration: float,
    rate: float,
    clients: int,
    sample_s: float,
    faults: Any,
    redis_keys: Any,
) -> list[Sample]:
    samples: list[Sample] = []
    start = time.monotonic()
    current = Sample(0.0)
    samples.append(current)
    stop = start + duration
    seq = 0

    async def worker(n: int, client: httpx.AsyncClient) -> None:
        nonlocal seq
        interval = clients / rate
        next_at = start + n * interval / clients
        while True:
            now = time.monotonic()
            if now >= stop:
                return
            if next_at > now:
                await asyncio.sleep(next_at - now)
            # a client that fell behind (a slow answer) skips the slots it missed
            # instead of bursting to catch up: the offered load stays steady
            next_at = max(next_at + interval, time.monotonic())
            seq += 1
            i = seq
            kind = i % 10
            key = f"client-{(i * 7919) % 1_000_000}"  # a new-ish key most of the time
            t0 = time.monotonic()
            try:
                if kind < 6:
                    r = await client.get("/api/items", headers={"x-api-key": key})
                elif kind < 8:
                    r = await client.post(
                        "/api/pay",
                        headers={"x-api-key": key, "x-req-id": f"pay-{i}"},
                        content=b"{}",
                    )
                else:
                    r = await client.get("/api/local", headers={"x-api-key": key})
                label = str(r.status_code)
            except httpx.HTTPError as exc:
                label = "no response: " + type(exc).__name__
            samples[-1].latencies.append(time.monotonic() - t0)
            samples[-1].statuses[label] += 1

    async def sampler(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(sample_s)
            try:
                stats = (await client.get("/_stats")).json()
            except httpx.HTTPError:
                stats = {}
            stats["redis_keys"] = await asyncio.to_thread(redis_keys)
            samples[-1].stats = stats
            samples.append(Sample(time.monotonic() - start))

    async def fault_driver() -> None:
        while time.monotonic() < stop:
            await asyncio.to_thread(faults, time.monotonic() - start)
            await asyncio.sleep(0.25)

    # The client lets idle connections go before the server does (uvicorn: 5 s),
    # so a request never races a keep-alive close: "no response" means a bug.
    limits = httpx.Limits(
        max_connections=clients + 4, max_keepalive_connections=clients + 4, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=base, timeout=10.0, limits=limits) as client:
        await asyncio.gather(
            sampler(client), fault_driver(), *(worker(n, client) for n in range(clients))
        )
        samples[-1].stats = (await client.get("/_stats")).json()
    return samples


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope dy/dx."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def plot(samples: list[Sample], faults: list[tuple[float, float, str]], duration: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: pip install -e '.[plot]' for benchmarks/soak.png")
        return False
    done = [s for s in samples if s.stats and s.latencies]
    t = [s.t / 60 for s in done]
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    rss, lat, out = axes
    rss.plot(t, [s.stats["rss"] / 1e6 for s in done], color="tab:blue")
    rss.set_ylabel("service RSS (MB)")
    rss.set_ylim(bottom=0)
    for q, color in ((0.5, "tab:green"), (0.95, "tab:orange"), (0.99, "tab:red")):
        lat.plot(
            t, [percentile(s.latencies, q) * 1000 for s in done], color=color, label=f"p{q * 100:g}"
        )
    lat.set_yscale("log")
    lat.set_ylabel("latency (ms)")
    lat.legend(loc="upper right")
    # each sample covers [t, next t): rates per second of that span
    span = [(done[i + 1].t if i + 1 < len(done) else s.t + 2.0) - s.t for i, s in enumerate(done)]
    span = [dt if dt > 0 else 1.0 for dt in span]
    groups = {
        "2xx": lambda k: k.startswith("2"),
        "429": lambda k: k == "429",
        "502/503/504": lambda k: k in ("502", "503", "504"),
        "500 / no response": lambda k: k == "500" or k.startswith("no response"),
    }
    for name, pick in groups.items():
        out.plot(
            t,
            [
                sum(n for k, n in s.statuses.items() if pick(k)) / dt
                for s, dt in zip(done, span, strict=True)
            ],
            label=name,
        )
    out.set_ylabel("responses / s")
    out.set_xlabel("minutes")
    out.legend(loc="upper right", fontsize=8)
    colors = {"flap": "#f5d", "hang": "#fc8", "reset": "#f88", "down": "#aaa"}
    for ax in axes:
        for start, end, what in faults:
            ax.axvspan(start / 60, end / 60, color=colors.get(what, "#8cf"), alpha=0.25, lw=0)
    for start, end, what in faults[: len(UPSTREAM_FAULTS) + len(REDIS_FAULTS)]:
        rss.text((start + end) / 120, 0.02, what, rotation=90, fontsize=7, va="bottom",
                 transform=rss.get_xaxis_transform())  # fmt: skip
    fig.suptitle(f"fidelity_mw soak: {duration / 60:.1f} min, steady load, periodic faults")
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds per sample")
    parser.add_argument("--no-redis", action="store_true", help="memory state, no Redis faults")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--no-faults", action="store_true", help="steady load only (a baseline)")
    parser.add_argument(
        "--serve", nargs=3, metavar=("PORT", "UPSTREAM", "STATE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.serve[2])
        return

    use_redis = not args.no_redis and shutil.which("redis-server") is not None
    workdir = Path(tempfile.mkdtemp(prefix="fidelity-soak-"))
    redis = Redis(workdir) if use_redis else None
    upstream = Upstream()
    port = free_port()
    if redis is not None:
        redis.start()
    state = redis.url if redis is not None else "memory://"
    service = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), upstream.url, state],
        cwd=Path(__file__).resolve().parents[1],
    )
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/_stats", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or service.poll() is not None:
                raise SystemExit("the service did not start")
            time.sleep(0.1)

        windows: list[tuple[float, float, str]] = []
        redis_down_at: list[float] = []

        def faults(t: float) -> None:
            """Called every 0.25 s: switch the upstream and Redis for time t."""
            if args.no_faults:
                return
            up = phase_at(t, UPSTREAM_FAULTS) or "ok"
            upstream.flap_on = int(t * 2) % 2 == 1  # 503 for 0.5 s, 200 for 0.5 s
            if up != upstream.mode:
                upstream.set_mode(up)
            if redis is not None:
                what = phase_at(t, REDIS_FAULTS)
                redis.pause(what == "redis paused")
                if what == "redis killed" and redis.proc is not None and redis.proc.poll() is None:
                    redis.kill()
                    redis_down_at.append(t)
                elif (
                    what != "redis killed"
                    and redis.proc is not None
                    and redis.proc.poll() is not None
                ):
                    redis.start()

        for cycle in range(int(args.duration // CYCLE_S) + 1):
            for start, end, what in UPSTREAM_FAULTS + (REDIS_FAULTS if redis else []):
                a, b = cycle * CYCLE_S + start, min(cycle * CYCLE_S + end, args.duration)
                if a < args.duration:
                    windows.append((a, b, what))
        windows.sort()
        print(f"soak: {args.duration:.0f} s at {args.rate:.0f} req/s, {args.clients} clients, "
              f"state {state}")  # fmt: skip
        samples = asyncio.run(
            run_load(
                base,
                args.duration,
                args.rate,
                args.clients,
                args.sample,
                faults,
                redis.dbsize if redis is not None else (lambda: None),
            )
        )
    finally:
        service.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.wait(10)
        if service.poll() is None:
            service.kill()
        upstream.close()
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    table = UPSTREAM_FAULTS + (REDIS_FAULTS if use_redis else [])
    png = PNG if plot(samples, windows, args.duration) else None
    summarize(samples, table, args, state, upstream, png)


def per_cycle(
    done: list[Sample], table: list[tuple[float, float, str]], sample_s: float
) -> list[dict[str, float]]:
    """Per 60 s fault cycle: latency percentiles (all samples, and quiet ones: no
    fault window nor the 6 s after one), requests, and RSS at the cycle's end."""

    def quiet(t: float) -> bool:
        # the sample covers [t, t + sample_s): it must not touch a fault or its aftermath
        for start, end, _ in table:
            offset = t % CYCLE_S
            if start - sample_s < offset < end + 6.0:
                return False
        return True

    out = []
    n_cycles = math.ceil((done[-1].t + sample_s) / CYCLE_S) if done else 0
    for c in range(n_cycles):
        span = [s for s in done if c * CYCLE_S <= s.t < (c + 1) * CYCLE_S]
        if not span:
            continue
        calm = [s for s in span if quiet(s.t)] or span
        lat = [v for s in span for v in s.latencies]
        calm_lat = [v for s in calm for v in s.latencies]
        out.append(
            {
                "start": c * CYCLE_S,
                "end": min((c + 1) * CYCLE_S, span[-1].t + sample_s),
                "n": len(lat),
                "p50": percentile(lat, 0.5) * 1000,
                "p99": percentile(lat, 0.99) * 1000,
                "quiet_p50": percentile(calm_lat, 0.5) * 1000,
                "quiet_p99": percentile(calm_lat, 0.99) * 1000,
                "rss_end": span[-1].stats["rss"] / 1e6,
            }
        )
    return out


def summarize(
    samples: list[Sample],
    table: list[tuple[float, float, str]],
    args: argparse.Namespace,
    state: str,
    upstream: Upstream,
    png: Path | None,
) -> None:
    done = [s for s in samples if s.stats and s.latencies]
    print("   t(s)  phase            n   p50ms   p99ms  RSS MB  fds tasks  local  redis  statuses")
    for s in done:
        phase = phase_at(s.t, table) or ""
        p50, p99 = percentile(s.latencies, 0.5) * 1000, percentile(s.latencies, 0.99) * 1000
        print(
            f"{s.t:7.1f}  {phase:12s} {len(s.latencies):5d} {p50:7.1f}"
            f" {p99:7.1f} {s.stats['rss'] / 1e6:7.1f}"
            f" {s.stats.get('fds', 0):4d} {s.stats.get('tasks', 0):5d}"
            f" {s.stats.get('keys')!s:>6} {s.stats.get('redis_keys')!s:>6}  {dict(s.statuses)}"
        )
    statuses: collections.Counter[str] = collections.Counter()
    for s in samples:
        statuses.update(s.statuses)
    total = sum(statuses.values())
    no_response = sum(n for k, n in statuses.items() if k.startswith("no response"))
    five_hundreds = statuses.get("500", 0)
    dup_posts = sum(1 for n in upstream.post_ids.values() if n > 1)
    cycles = per_cycle(done, table, args.sample)
    fds = [s.stats.get("fds", 0) for s in done]
    tasks = [s.stats.get("tasks", 0) for s in done]
    keys = [s.stats.get("keys") for s in done if s.stats.get("keys") is not None]
    rkeys = [s.stats["redis_keys"] for s in done if s.stats.get("redis_keys") is not None]
    counts = done[-1].stats.get("counts", {}) if done else {}
    fallback = sum(n for k, n in counts.items() if k.endswith("/fallback"))
    # Compare like with like: the same phase of the fault cycle. The first cycle
    # is warm-up (allocator, pools, key table filling up to max_keys).
    base = cycles[1] if len(cycles) > 2 else cycles[0]
    end = cycles[-1]
    memory_grew = end["rss_end"] - base["rss_end"] > max(2.0, 0.05 * base["rss_end"])
    latency_grew = (
        end["quiet_p50"] > 1.25 * base["quiet_p50"] + 1.0
        or end["quiet_p99"] > 1.5 * base["quiet_p99"] + 5.0
    )
    verdict_mem = "**memory did not grow**" if not memory_grew else "**memory grew**"
    verdict_lat = "**latency did not grow**" if not latency_grew else "**latency grew**"
    rss_slope = slope(
        [s.t / 60 for s in done if s.t >= base["start"]],
        [s.stats["rss"] / 1e6 for s in done if s.t >= base["start"]],
    )
    table_lines = [
        "| cycle (s) | requests | quiet p50 / p99 ms | all p50 / p99 ms | RSS at end MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in cycles:
        table_lines.append(
            f"| {c['start']:.0f} to {c['end']:.0f} | {c['n']:,} | {c['quiet_p50']:.1f} / "
            f"{c['quiet_p99']:.1f} | {c['p50']:.1f} / {c['p99']:.1f} | {c['rss_end']:.1f} |"
        )

    lines = [
        stamp(),
        "",
        f"`benchmarks/soak.py --duration {args.duration:g}`: {args.duration / 60:.1f} min at "
        f"{args.rate:g} req/s from {args.clients} clients (60 % GET through the transport, "
        "20 % POST through the transport, 20 % local), API keys rotating over 1M values "
        "(max_keys 2,000, so the bound is reached early); "
        f"state `{state.split('@')[-1]}`. Every 60 s: upstream flapping 503/200 (6 s), "
        "hanging past the 200 ms attempt timeout (4 s), resetting connections (3 s), "
        "refusing them (3 s)"
        + (
            "; Redis paused (SIGSTOP, 2 s) and killed then restarted (2 s)."
            if "redis" in state
            else "."
        )
        + f" Samples every {args.sample:g} s. The service, the load and the upstream share "
        "the machine's 2 cores (with whatever else runs): absolute latencies are not the "
        "point, their trend is.",
        "",
        f"- Requests: {total:,}; " + ", ".join(f"{k}: {n:,}" for k, n in sorted(statuses.items())),
        f"- Invariants: requests without a response **{no_response}**, 500s **{five_hundreds}**, "
        f"POSTs that reached the upstream twice **{dup_posts}** (of {len(upstream.post_ids):,}).",
        f"- Memory: service RSS {base['rss_end']:.1f} MB at the end of cycle "
        f"{cycles.index(base) + 1}, {end['rss_end']:.1f} MB at the end of the run "
        f"({end['rss_end'] - base['rss_end']:+.1f} MB; slope since {base['start']:.0f} s "
        f"{rss_slope:+.2f} MB/min): {verdict_mem}. Local key table {min(keys, default=0):,}"
        f"..{max(keys, default=0):,} keys"
        + (f", Redis {min(rkeys):,}..{max(rkeys):,} keys" if rkeys else "")
        + f"; fds {min(fds, default=0)}..{max(fds, default=0)}; "
        f"asyncio tasks {min(tasks, default=0)}..{max(tasks, default=0)} (in flight).",
        f"- Latency in the quiet part of each cycle (no fault, nor within 6 s after one): p50 "
        f"{base['quiet_p50']:.1f} → {end['quiet_p50']:.1f} ms, p99 {base['quiet_p99']:.1f} → "
        f"{end['quiet_p99']:.1f} ms (cycle {cycles.index(base) + 1} → last): {verdict_lat}.",
        f"- Decisions on fallback state (Redis unreachable): {fallback:,}.",
        "- Criteria: memory grew if RSS at the end of the run is more than max(2 MB, 5 %) above "
        "its value at the end of the second cycle (the first is warm-up); latency grew if the "
        "last cycle's quiet p50 is above 1.25x the second cycle's + 1 ms, or its quiet p99 "
        "above 1.5x + 5 ms.",
        "",
        *table_lines,
    ]
    if png is not None:
        lines += ["", "![soak](soak.png)"]
    body = "\n".join(lines)
    print(body)
    if not args.no_results:
        write_section("Soak", body)
    if no_response or five_hundreds or dup_posts:
        raise SystemExit("soak: an invariant was broken (see above)")


if __name__ == "__main__":
    main()
