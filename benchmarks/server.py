"""Throughput under a real server: uvicorn (1 worker, uvloop + httptools) under a load generator.

Variants (each its own uvicorn process serving one Starlette route, GET /hello -> "ok"):
  bare              the route alone
  noop              + a pure ASGI pass-through middleware (what any middleware layer costs)
  headers           + a pure ASGI middleware that only adds two constant response headers,
                    as long as fidelity's RateLimit fields (what the server pays to write them)
  handwritten       + overhead.py's hand-written floor (client key, token bucket, breaker;
                    no response headers): the least a limiter middleware costs here
  fidelity-memory   + FidelityMiddleware, memory state
  fidelity-noheaders  the same with `rate_limit_headers = "on_reject"` (no RateLimit fields
                    on allowed responses)
  fidelity-frame    FidelityMiddleware with its layers off (no limit, breaker or deadline):
                    the context, the send wrapper, the plan lookup; then the layers switched
                    on one at a time: fidelity-deadline (+ the caller's deadline, armed),
                    fidelity-breaker (+ the route breaker), fidelity-noheaders (+ the limit),
                    fidelity-memory (+ its RateLimit fields), fidelity-telemetry (+ the
                    default observer, as the two-line setup has it, no OpenTelemetry SDK
                    configured), fidelity-metrics (+ an SDK MeterProvider, tracing off: the
                    request counted): where the cost goes
  fidelity-redis    + FidelityMiddleware, redis:// (exact)
  fidelity-tiered   + FidelityMiddleware, tiered+redis://
  slowapi-memory    + slowapi's ASGI middleware, memory storage
  slowapi-redis     + slowapi's ASGI middleware, Redis storage (limits' blocking client)
  VARIANT+compiled  VARIANT served by .venv-compiled (the mypyc build: scripts/compiled.sh)

`fidelity-memory@REV` (or `fidelity-redis@REV`, `fidelity-tiered@REV`) serves
FidelityMiddleware as of git revision REV (extracted under another package name, as
benchmarks/overhead.py `--baseline` does): a change measured before and after in the same rounds.

Every middleware has one permissive per-client limit (every response must be a
200); FidelityMiddleware also has its default route breaker and a deadline from
`x-request-timeout-ms`, which wrk sends; telemetry off. All requests come from
127.0.0.1, so the limit has one hot key.

The servers run pinned to one core, the load generator and redis-server to the other
(taskset). Each round measures every variant once at each connection count,
in an order that reverses from one round to the next, after a short warm-up.
The generator is benchmarks/loadgen.c (built with `cc` on first use; `--generator
loadgen`), which warms up on the connections it measures and waits until every one of
them has had an answer: uvloop accepts one connection per loop turn, so N connections
opened at once into a busy server wait up to N turns (seconds at 256), and wrk (`--generator
wrk`, the fallback without a C compiler), whose warm-up and measurement each open fresh
connections, counts that ramp, multiplied by its correction for coordinated omission, in
its p99. Per measurement: req/s and p99 from the generator, non-2xx
responses and socket errors (both must be 0), the server's CPU time per request
(utime + stime of its process from /proc), and Redis commands per request
(`INFO commandstats` deltas, our own INFO calls excluded). Ratios to bare are
paired per round; the table shows their medians. Load only on loopback, each
measurement bounded by the generator's duration.

    .venv/bin/python benchmarks/server.py [--rounds 3] [--duration 5] [--warmup 1]
        [--connections 32,256] [--variants bare,fidelity-memory,...] [--rt] [--no-write]

Needs a C compiler (`cc`) for the generator, or else `wrk` (Debian package `wrk`: installed
with apt-get when missing and run as root), and `redis-server` (started on a free loopback
port and stopped). `--rt` (root) runs servers and generator SCHED_RR with the kernel's RT
throttling off for the run, as `overload.py --rt` does: on a busy machine the server's core
is then its own.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.overload import _rt_unthrottled

VARIANTS = (
    "bare",
    "noop",
    "headers",
    "handwritten",
    "fidelity-memory",
    "fidelity-noheaders",
    "fidelity-frame",
    "fidelity-deadline",
    "fidelity-breaker",
    "fidelity-telemetry",
    "fidelity-metrics",
    "fidelity-redis",
    "fidelity-tiered",
    "slowapi-memory",
    "slowapi-redis",
)
# a run without --variants: the comparisons issue 17 asks for (the others diagnose)
DEFAULT_VARIANTS = (
    "bare",
    "fidelity-memory",
    "fidelity-redis",
    "fidelity-tiered",
    "slowapi-memory",
    "slowapi-redis",
)
REDIS_VARIANTS = {"fidelity-redis", "fidelity-tiered", "slowapi-redis"}
# FidelityMiddleware's layers switched on one at a time (no rate limit: no RateLimit fields)
LAYER_VARIANTS = {"fidelity-frame", "fidelity-deadline", "fidelity-breaker"}


def is_redis(variant: str) -> bool:
    return variant.split("@", 1)[0].removesuffix("+compiled") in REDIS_VARIANTS


# `VARIANT+compiled` (e.g. `fidelity-memory+compiled`): the same server run by the venv of
# the mypyc build (`bash scripts/compiled.sh` makes it; docs/compiled.md), or the Python
# that FIDELITY_MW_COMPILED_PYTHON names (another revision's compiled venv, to compare)
COMPILED_SUFFIX = "+compiled"
COMPILED_PYTHON = Path(
    os.environ.get("FIDELITY_MW_COMPILED_PYTHON")
    or Path(__file__).resolve().parents[1] / ".venv-compiled" / "bin" / "python"
)
HOST = "127.0.0.1"
PREFIX = "bench-server"
PERMISSIVE = "1000000000/second"
DEADLINE_HEADER = "x-request-timeout-ms: 5000"
# wrk's own summary as one JSON line: its text output rounds p99 and hides error kinds
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %.0f, "p99_us": %.0f, "max_us": %.0f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# ---------------------------------------------------------------- the served apps


# what FidelityMiddleware adds to an allowed response here, byte for byte in length
STAND_IN_HEADERS = (
    (b"ratelimit-policy", b'"per-client";q=1000000000;w=1'),
    (b"ratelimit", b'"per-client";r=999999998;t=0'),
)


class Passthrough:
    """A pure ASGI middleware that does nothing but (optionally) add response headers."""

    def __init__(self, app: Any, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self.headers:
            await self.app(scope, receive, send)
            return
        extra = self.headers

        async def add_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, add_headers)


def baseline_app(variant: str, redis_url: str) -> Any:
    """`fidelity-memory@REV` / `fidelity-redis@REV` / `fidelity-tiered@REV`:
    FidelityMiddleware as of git revision REV, same app and policy."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from benchmarks._asgi import hello
    from benchmarks.overhead import baseline_package

    kind, rev = variant.split("@", 1)
    if kind not in ("fidelity-memory", "fidelity-redis", "fidelity-tiered"):
        raise SystemExit(f"only fidelity-memory, -redis or -tiered @REV, not {variant!r}")
    old = baseline_package(rev)
    own_scripts(old.__name__)
    url = {"fidelity-redis": redis_url, "fidelity-tiered": "tiered+" + redis_url}.get(
        kind, "memory://"
    )
    policy = old.Policy(
        state=old.StateConfig(url=url, key_prefix=PREFIX),
        rate_limits=(old.RateLimit(name="per-client", rate=PERMISSIVE, key="client_ip"),),
    )
    return old.FidelityMiddleware(
        Starlette(routes=[Route("/hello", hello)]), policy=policy, telemetry=False
    )


def own_scripts(package: str) -> None:
    """Make a baseline package read its own Lua scripts: `state/scripts.py` names the
    package `fidelity_mw`, so an extracted revision would otherwise run the working
    tree's scripts (with its own arguments). Before its Redis store is imported."""
    import importlib
    import importlib.resources

    if f"{package}.state.redis" in sys.modules:
        raise RuntimeError(f"{package}.state.redis was imported before its scripts were set")
    scripts = importlib.import_module(f"{package}.state.scripts")
    lua = importlib.resources.files(f"{package}.state").joinpath("lua")

    def load_script(name: str) -> Any:
        lib = lua.joinpath("lib.lua").read_text(encoding="utf-8")
        entry = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        source = f"{lib}\n-- ---- {name}.lua\n{entry}"
        return scripts.Script(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())

    scripts.load_script = load_script


def build_app(variant: str, redis_url: str) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from benchmarks._asgi import hello

    routes = [Route("/hello", hello)]
    if "@" in variant:
        return baseline_app(variant, redis_url)
    if variant == "bare":
        return Starlette(routes=routes)
    if variant == "noop":
        return Passthrough(Starlette(routes=routes))
    if variant == "handwritten":  # overhead.py's floor: client key + token bucket + breaker
        from benchmarks.overhead import HandwrittenMiddleware

        return HandwrittenMiddleware(Starlette(routes=routes))
    if variant == "headers":
        return Passthrough(Starlette(routes=routes), STAND_IN_HEADERS)
    if variant in LAYER_VARIANTS:
        from fidelity_mw import DeadlineConfig, FidelityMiddleware, Policy, StateConfig

        state = StateConfig(url="memory://", key_prefix=PREFIX)
        if variant == "fidelity-frame":  # (no header of wrk's names a deadline here)
            policy = Policy(
                state=state,
                breaker=None,
                deadline=DeadlineConfig(default_ms=None, header=("x-no",)),
            )
        else:
            policy = Policy(
                state=state, **({"breaker": None} if variant == "fidelity-deadline" else {})
            )
        return FidelityMiddleware(Starlette(routes=routes), policy=policy, telemetry=False)
    if variant.startswith("fidelity-"):
        from fidelity_mw import FidelityMiddleware, Policy, RateLimit, StateConfig

        kind = variant.removeprefix("fidelity-")
        url = {"redis": redis_url, "tiered": "tiered+" + redis_url}.get(kind, "memory://")
        policy = Policy(
            state=StateConfig(url=url, key_prefix=PREFIX),
            rate_limits=(RateLimit(name="per-client", rate=PERMISSIVE, key="client_ip"),),
            rate_limit_headers="on_reject" if kind == "noheaders" else "always",
        )
        if kind == "telemetry":  # the default observer; no SDK set up in this process
            return FidelityMiddleware(Starlette(routes=routes), policy=policy)
        if kind == "metrics":  # counted: an SDK meter (read on demand), no tracer
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
            return FidelityMiddleware(
                Starlette(routes=routes), policy=policy, meter_provider=meters
            )
        return FidelityMiddleware(Starlette(routes=routes), policy=policy, telemetry=False)
    if variant.startswith("slowapi-"):
        from slowapi import Limiter
        from slowapi.middleware import SlowAPIASGIMiddleware
        from slowapi.util import get_remote_address
        from starlette.middleware import Middleware

        storage = "memory://" if variant == "slowapi-memory" else redis_url
        app = Starlette(routes=routes, middleware=[Middleware(SlowAPIASGIMiddleware)])
        app.state.limiter = Limiter(
            key_func=get_remote_address, default_limits=[PERMISSIVE], storage_uri=storage
        )
        return app
    raise SystemExit(f"unknown variant {variant!r}")


def serve(
    variant: str, port: int, redis_url: str, gc_freeze: bool = False, gc_stats: str = ""
) -> None:
    import uvicorn

    app = build_app(variant, redis_url)
    if gc_stats:
        count_collections(Path(gc_stats))
    if gc_freeze:
        # Everything imported and built so far moves to the permanent generation:
        # full collections then scan only what requests allocate (a deployment
        # choice, made for every variant alike).
        gc.collect()
        gc.freeze()
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        workers=1,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def count_collections(path: Path) -> None:
    """Count this process's garbage collections per generation and the time they took;
    on SIGUSR1, write the totals so far to `path` as JSON (`gc_totals` reads them)."""
    import signal

    totals = [[0, 0.0], [0, 0.0], [0, 0.0]]  # per generation: collections, seconds
    began = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            total = totals[info["generation"]]
            total[0] += 1
            total[1] += time.perf_counter() - began[0]

    def write(signum: int, frame: object) -> None:
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps({"at": time.monotonic_ns(), "gc": totals}))
        staged.replace(path)

    gc.callbacks.append(on_gc)
    signal.signal(signal.SIGUSR1, write)


def gc_stats_path(logdir: Path, variant: str) -> Path:
    return logdir / f"{variant}.gc.json"


def gc_totals(pid: int, path: Path) -> list[list[float]]:
    """The collections a server process made so far (`count_collections`): asks it with
    SIGUSR1 and waits for its answer (written between two of its bytecodes)."""
    import signal

    before = path.read_text() if path.exists() else ""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            text = path.read_text()
            if text and text != before:
                return [list(g) for g in json.loads(text)["gc"]]
        time.sleep(0.002)
    raise RuntimeError(f"server {pid} did not report its collections")


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    if cpu is None:
        return argv
    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit("taskset not found (Debian package util-linux); or pass --no-pin")
    return [taskset, "-c", str(cpu), *argv]


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt and os.geteuid() == 0:
        print("wrk not found: installing the Debian package...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run([apt, "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
            subprocess.run(
                [apt, "install", "-y", "-qq", "wrk"], check=True, env=env, stdout=subprocess.DEVNULL
            )
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit(
        "wrk not found: install it (Debian/Ubuntu: `sudo apt-get install wrk`; "
        "macOS: `brew install wrk`) and run again"
    )


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process, in seconds: its own code's time (the interpreter, the
    app, uvloop) and the kernel's on its behalf (sockets, system calls)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def redis_connections(pid: int, redis_port: int) -> int:
    """Open TCP connections from process `pid` to the Redis port (its client pool's size)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = row.split()
                if int(cols[2].rsplit(":", 1)[1], 16) == redis_port and cols[9] in inodes:
                    count += 1
    return count


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    import http.client

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode}")
        conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
        try:
            conn.request("GET", "/hello")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    raise SystemExit(f"server on port {port} did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def redis_server(cpu: int | None, rt: bool = False) -> Iterator[tuple[str, int, int]]:
    """A throwaway redis-server on a free loopback port: (url, pid, port)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (Debian package redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        argv += ["--dir", workdir]
        proc = subprocess.Popen(
            realtime(rt, pinned(cpu, argv)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"redis://{HOST}:{port}/0"
        try:
            for _ in range(500):
                try:
                    if redis.Redis.from_url(url, socket_timeout=0.2).ping():
                        break
                except redis.RedisError:
                    time.sleep(0.02)
            else:
                raise SystemExit("redis-server did not start")
            yield url, proc.pid, port
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextlib.contextmanager
def servers(
    variants: Sequence[str], redis_url: str, cpu: int | None, logdir: Path, gc_freeze: bool = False,
    rt: bool = False, gc_stats: bool = False,
) -> Iterator[dict[str, tuple[int, int]]]:  # fmt: skip
    """One uvicorn process per variant, all pinned to `cpu`: variant -> (port, pid)."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    try:
        for variant in variants:
            port = free_port()
            served = variant.removesuffix(COMPILED_SUFFIX)
            python = sys.executable if served == variant else str(COMPILED_PYTHON)
            argv = [python, str(Path(__file__).resolve()), "--serve", served]
            argv += ["--port", str(port), "--redis-url", redis_url]
            if gc_freeze:
                argv.append("--gc-freeze")
            if gc_stats:
                argv += ["--gc-stats-file", str(gc_stats_path(logdir, variant))]
            with (logdir / f"{variant}.log").open("wb") as log:
                procs[variant] = subprocess.Popen(
                    realtime(rt, pinned(cpu, argv)), stdout=log, stderr=subprocess.STDOUT
                )
            ports[variant] = port
        for variant, proc in procs.items():
            wait_ready(ports[variant], proc)
        yield {v: (ports[v], procs[v].pid) for v in variants}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


# ---------------------------------------------------------------- measuring


@dataclass
class Sample:
    variant: str
    connections: int
    round: int
    rps: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    error_kinds: dict[str, int]
    requests: int
    cpu_us_per_req: float
    redis_cpu_us_per_req: float | None
    redis_cmds: dict[str, int] = field(default_factory=dict)
    redis_clients: int | None = None
    loadavg: str = ""
    # the user-space share of cpu_us_per_req (the rest is the kernel's)
    user_us_per_req: float | None = None
    # loadgen: when the last connection had its first answer (from the first connect), and
    # the connections with none by 5 s past the warm-up (none measured before they all had one)
    ramp_ms: float | None = None
    unserved: int = 0
    # --gc-stats: the server's collections over the measurement, per generation
    # [collections, seconds] (after the snapshot's own: none of ours are counted)
    collections: list[list[float]] | None = None

    def gc_note(self) -> str:
        """Collections per 1,000 requests by generation, and their time per request."""
        if self.collections is None:
            return ""
        per = 1000 / max(1, self.requests)
        counts = "/".join(f"{n * per:.1f}" for n, _ in self.collections)
        spent = sum(t for _, t in self.collections) * 1e6 / max(1, self.requests)
        return f"gc {counts} per 1k req (gen0/1/2), {spent:.1f} µs/req"

    @property
    def redis_per_req(self) -> float:
        return sum(self.redis_cmds.values()) / max(1, self.requests)


def commandstats(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"  # our own snapshots
    }


def run_wrk(
    wrk: str, script: Path, port: int, connections: int, seconds: int, cpu: int | None,
    rt: bool = False,
) -> dict[str, Any]:  # fmt: skip
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
    argv += ["-s", str(script), "-H", DEADLINE_HEADER, f"http://{HOST}:{port}/hello"]
    out = subprocess.run(
        realtime(rt, pinned(cpu, argv)), check=True, capture_output=True, text=True,
        timeout=seconds + 60,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            return dict(json.loads(line.removeprefix("WRKJSON ")))
    raise RuntimeError(f"no summary from wrk:\n{out}")


LOADGEN_SOURCE = Path(__file__).resolve().with_name("loadgen.c")


def build_loadgen(into: Path) -> str | None:
    """benchmarks/loadgen.c compiled into `into` with the system's C compiler (None without
    one: the caller falls back to wrk)."""
    cc = next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)
    if cc is None:
        return None
    binary = into / "loadgen"
    subprocess.run([cc, "-O2", "-o", str(binary), str(LOADGEN_SOURCE)], check=True)
    return str(binary)


def run_loadgen(
    loadgen: str, port: int, connections: int, warmup: float, seconds: float, cpu: int | None,
    rt: bool, at_window: Callable[[], None], timeout_s: float = 5.0,
) -> dict[str, Any]:  # fmt: skip
    """One measurement on one set of connections: the warm-up, then until every connection
    has had an answer, then `seconds` measured; `at_window()` runs when the measured window
    opens (the summary's keys are wrk's, plus ramp_us, when the last connection had its first
    answer, and unserved, connections never answered within `timeout_s` past the warm-up;
    timeout counts the requests unanswered for longer than that at the end)."""
    argv = [loadgen, str(port), str(connections), f"{warmup:g}", f"{seconds:g}", f"{timeout_s:g}"]
    argv.append(DEADLINE_HEADER)
    with subprocess.Popen(
        realtime(rt, pinned(cpu, argv)), stdout=subprocess.PIPE, text=True
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            if line.startswith("WINDOW"):
                at_window()
            lines.append(line)
        if proc.wait(timeout=warmup + timeout_s + seconds + 60) != 0:
            raise RuntimeError(f"loadgen exited with {proc.returncode}")
    for line in lines:
        if line.startswith("LOADGEN "):
            return dict(json.loads(line.removeprefix("LOADGEN ")))
    raise RuntimeError("no summary from loadgen:\n" + "".join(lines))


def realtime(rt: bool, argv: list[str]) -> list[str]:
    """Under `--rt`, `argv` run SCHED_RR (priority 1)."""
    if not rt:
        return argv
    chrt = shutil.which("chrt")
    if chrt is None:
        raise SystemExit("chrt not found (Debian package util-linux); or run without --rt")
    return [chrt, "-r", "1", *argv]


def measure_one(
    args: argparse.Namespace,
    generator: str,
    script: Path,
    variant: str,
    port: int,
    pid: int,
    connections: int,
    round_no: int,
    redis_client: Any,
    redis_pid: int,
    redis_port: int,
) -> Sample:
    before: dict[str, Any] = {}

    def snapshot() -> None:  # when the measured window opens
        before["stats"] = commandstats(redis_client)
        before["cpu"] = cpu_times(pid)
        before["redis_cpu"] = cpu_seconds(redis_pid)
        before["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        if args.gc_stats:
            before["gc"] = gc_totals(pid, gc_stats_path(args.logdir, variant))

    if getattr(args, "generator", "wrk") == "wrk":
        if args.warmup > 0:
            run_wrk(generator, script, port, connections, args.warmup, args.load_cpu, args.rt)
        snapshot()
        result = run_wrk(
            generator, script, port, connections, args.duration, args.load_cpu, args.rt
        )
    else:
        result = run_loadgen(
            generator, port, connections, args.warmup, args.duration, args.load_cpu, args.rt,
            snapshot,
        )  # fmt: skip
    before_stats = before["stats"]
    before_user, before_system = before["cpu"]
    before_redis_cpu = before["redis_cpu"]
    loadavg = before["loadavg"]
    after_user, after_system = cpu_times(pid)
    collections = None
    if args.gc_stats:
        after_gc = gc_totals(pid, gc_stats_path(args.logdir, variant))
        pairs = zip(after_gc, before["gc"], strict=True)
        collections = [[a[0] - b[0], a[1] - b[1]] for a, b in pairs]
    user = after_user - before_user
    cpu = user + after_system - before_system
    redis_cpu = cpu_seconds(redis_pid) - before_redis_cpu
    after_stats = commandstats(redis_client)
    clients = redis_connections(pid, redis_port)
    requests = int(result["requests"])
    deltas = {
        name: calls - before_stats.get(name, 0)
        for name, calls in after_stats.items()
        if calls > before_stats.get(name, 0)
    }
    kinds = {k: int(result[k]) for k in ("connect", "read", "write", "timeout") if result[k]}
    return Sample(
        variant=variant,
        connections=connections,
        round=round_no,
        rps=requests / (int(result["duration_us"]) / 1e6),
        p99_ms=float(result["p99_us"]) / 1000.0,
        non2xx=int(result["status"]),
        socket_errors=sum(kinds.values()),
        error_kinds=kinds,
        requests=requests,
        cpu_us_per_req=cpu * 1e6 / max(1, requests),
        user_us_per_req=user * 1e6 / max(1, requests),
        redis_cpu_us_per_req=redis_cpu * 1e6 / max(1, requests),
        redis_cmds=deltas,
        redis_clients=clients,
        loadavg=loadavg,
        ramp_ms=float(result["ramp_us"]) / 1000.0 if "ramp_us" in result else None,
        unserved=int(result.get("unserved", 0)),
        collections=collections,
    )


def measure(args: argparse.Namespace) -> list[Sample]:
    import redis

    samples: list[Sample] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        args.logdir = tmp
        generator = build_loadgen(tmp) if args.generator in ("auto", "loadgen") else None
        if generator is None:
            if args.generator == "loadgen":
                raise SystemExit("--generator loadgen needs a C compiler (cc, gcc or clang)")
            args.generator, generator = "wrk", ensure_wrk()
        else:
            args.generator = "loadgen"
        script = tmp / "summary.lua"
        script.write_text(WRK_SCRIPT)
        args.rt_note = stack.enter_context(_rt_unthrottled(args.rt))
        url, redis_pid, redis_port = stack.enter_context(redis_server(args.redis_cpu, args.rt))
        client = stack.enter_context(redis.Redis.from_url(url))
        running = stack.enter_context(
            servers(
                args.variants, url, args.server_cpu, tmp, args.gc_freeze, args.rt, args.gc_stats
            )
        )
        order = list(args.variants)
        total = args.rounds * len(order) * len(args.connections)
        for round_no in range(args.rounds):
            for connections in args.connections:
                for variant in order:
                    port, pid = running[variant]
                    sample = measure_one(
                        args, generator, script, variant, port, pid, connections, round_no,
                        client, redis_pid, redis_port,
                    )  # fmt: skip
                    samples.append(sample)
                    print(
                        f"[{len(samples)}/{total}] round {round_no + 1} c{connections} "
                        f"{variant}: {sample.rps:,.0f} req/s, p99 {sample.p99_ms:.1f} ms, "
                        f"cpu {sample.cpu_us_per_req:.0f} µs/req, "
                        f"redis {sample.redis_per_req:.2f} cmd/req, "
                        f"non-2xx {sample.non2xx}, errors {sample.socket_errors}, "
                        + (
                            f"all {connections} answered after {sample.ramp_ms:.0f} ms"
                            f"{f' ({sample.unserved} never)' if sample.unserved else ''}, "
                            if sample.ramp_ms is not None
                            else ""
                        )
                        + (f"{sample.gc_note()}, " if sample.collections is not None else "")
                        + f"load {sample.loadavg}",
                        file=sys.stderr,
                        flush=True,
                    )
            order.reverse()  # ABBA: drift within a round cancels across two rounds
        with contextlib.suppress(Exception):
            args.redis_version = str(client.info("server")["redis_version"])
    return samples


# ---------------------------------------------------------------- report


SCRIPT_CALLS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


def fmt_cmds(samples: Sequence[Sample]) -> str:
    """Commands per request (those run inside scripts included), script calls per request
    (each one round trip), the most frequent commands, and the server's pool size."""
    requests = sum(s.requests for s in samples)
    totals: dict[str, int] = {}
    for s in samples:
        for name, calls in s.redis_cmds.items():
            totals[name] = totals.get(name, 0) + calls
    if not totals:
        return "—"
    total = sum(totals.values()) / requests
    scripts = sum(totals.get(name, 0) for name in SCRIPT_CALLS) / requests
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:4]
    parts = ", ".join(f"{calls / requests:.2f} {name.upper()}" for name, calls in top)
    clients = max((s.redis_clients or 0) for s in samples)
    return f"{total:.2f} ({parts}) | {scripts:.3f} | {clients}"


# issue 17's goals under this server: (variant, reference, least ratio of req/s)
GOALS = (
    ("fidelity-memory", "bare", 0.9),
    ("fidelity-redis", "fidelity-memory", 0.5),
    ("fidelity-redis", "slowapi-redis", 2.0),
    ("fidelity-tiered", "fidelity-memory", 0.9),
)
P99_GOAL_MS = {("fidelity-redis", 256): 100.0}


def paired(at: Sequence[Sample], variant: str, reference: str) -> tuple[float, float] | None:
    """Medians over rounds of variant/reference: req/s, and the req/s a CPU-bound server
    would reach from the CPU time per request (steady when the machine is busy)."""
    ref = {s.round: s for s in at if s.variant == reference}
    mine = [s for s in at if s.variant == variant and s.round in ref]
    if not mine:
        return None
    rps = statistics.median(s.rps / ref[s.round].rps for s in mine)
    cpu = statistics.median(ref[s.round].cpu_us_per_req / s.cpu_us_per_req for s in mine)
    return rps, cpu


def goals(at: Sequence[Sample], connections: int) -> list[str]:
    out = []
    for variant, reference, least in GOALS:
        got = paired(at, variant, reference)
        if got is None:
            continue
        rps, cpu = got
        verdict = "met" if rps >= least else "missed"
        out.append(
            f"- {variant} / {reference}: {rps:.2f} in req/s, {cpu:.2f} from CPU per request "
            f"(goal ≥ {least:g}: {verdict})"
        )
    for (variant, conns), most in P99_GOAL_MS.items():
        p99s = [s.p99_ms for s in at if s.variant == variant and s.connections == conns]
        if conns == connections and p99s:
            p99 = statistics.median(p99s)
            verdict = "met" if p99 <= most else "missed"
            out.append(f"- {variant} p99: {p99:.0f} ms (goal ≤ {most:g} ms: {verdict})")
    return (
        ["", "Against the goals set in issue 17 (medians of per-round ratios):", "", *out]
        if out
        else []
    )


def report(samples: Sequence[Sample], args: argparse.Namespace) -> str:
    lines: list[str] = []
    for connections in args.connections:
        at = [s for s in samples if s.connections == connections]
        bare = {s.round: s for s in at if s.variant == "bare"}
        lines += [
            f"**{connections} connections** ({generator_line(args, connections)})",
            "",
            "| variant | req/s (median) | ratio to bare: median (per round) | p99 ms "
            "| non-2xx / socket errors | server CPU µs/req (ratio to bare), of it user space "
            "| redis-server CPU µs/req | Redis commands/req (most frequent) "
            "| script calls/req | Redis connections |",
            "|---|---:|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for variant in args.variants:
            mine = sorted((s for s in at if s.variant == variant), key=lambda s: s.round)
            if not mine:
                continue
            ratios = [s.rps / bare[s.round].rps for s in mine if s.round in bare]
            ratio = (
                f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})"
                if ratios
                else "—"
            )
            redis_cpu = (
                f"{statistics.median(s.redis_cpu_us_per_req or 0.0 for s in mine):.0f}"
                if is_redis(variant)
                else "—"
            )
            cpu_ratios = [
                s.cpu_us_per_req / bare[s.round].cpu_us_per_req for s in mine if s.round in bare
            ]
            cpu = f"{statistics.median(s.cpu_us_per_req for s in mine):.0f}"
            if cpu_ratios:
                cpu += f" ({statistics.median(cpu_ratios):.2f}x)"
            users = [s.user_us_per_req for s in mine if s.user_us_per_req is not None]
            if users:
                cpu += f", user {statistics.median(users):.0f}"
            kinds: dict[str, int] = {}
            for s in mine:
                for kind, n in s.error_kinds.items():
                    kinds[kind] = kinds.get(kind, 0) + n
            bad = f"{sum(s.non2xx for s in mine)} / {sum(kinds.values())}"
            if kinds:
                bad += " (" + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + ")"
            lines.append(
                f"| {variant} | {statistics.median(s.rps for s in mine):,.0f} | {ratio} "
                f"| {statistics.median(s.p99_ms for s in mine):.1f} | {bad} "
                f"| {cpu} | {redis_cpu} "
                f"| {fmt_cmds(mine) if is_redis(variant) else '— | — | —'} |"
            )
        lines += goals(at, connections)
        lines.append("")
    loads = [s.loadavg for s in samples if s.loadavg]
    failures = sum(s.non2xx + s.socket_errors for s in samples)
    lines += [
        f"{args.rounds} round{'s' if args.rounds != 1 else ''}; in each, every variant once "
        "per connection count, the order "
        f"reversed from one round to the next; {warmup_note(args, samples)}. "
        f"uvicorn {uvicorn_version()} "
        f"(1 worker, uvloop, httptools) pinned to CPU {args.server_cpu}; {generator_name(args)} "
        f"and redis-server {getattr(args, 'redis_version', '?')} pinned "
        f"to CPU {args.load_cpu}{getattr(args, 'rt_note', '')}. One permissive per-client "
        "limit (one hot key: every request comes from 127.0.0.1); FidelityMiddleware also "
        "runs its default route breaker and a deadline header, telemetry off. Server CPU is "
        "utime + stime of the uvicorn process over the measurement, divided by the requests "
        "served (ratio to bare paired per round); "
        "on a busy machine it moves much less than req/s, which depends on the CPU time the "
        "server's core has to spare; the goals' \"from CPU per request\" ratio (the reference's "
        "CPU per request over the variant's) is the req/s ratio a server with its core to "
        "itself would show. Redis commands are `INFO commandstats` deltas, which count "
        "the commands a script runs as well as the script call itself (`EVALSHA`): script "
        "calls per request are the round trips; Redis connections are the server process's "
        "open sockets to Redis after the run. Ratios are paired per round.",
        "",
        f"Machine load (1/5/15-min load average at each measurement's start): first "
        f"{loads[0] if loads else '?'}, last {loads[-1] if loads else '?'}, highest 1-min "
        f"{max((float(x.split()[0]) for x in loads), default=0.0):.2f}. "
        f"Non-2xx responses and socket errors over the run: {failures}"
        + (" (must be 0: see the table)." if failures else "."),
    ]
    return "\n".join(lines)


def generator_line(args: argparse.Namespace, connections: int) -> str:
    if getattr(args, "generator", "wrk") == "wrk":
        return f"`wrk -t1 -c{connections} -d{args.duration:g}s`"
    return f"`loadgen {connections} connections, {args.duration:g} s`"


def generator_name(args: argparse.Namespace) -> str:
    if getattr(args, "generator", "wrk") == "wrk":
        return f"wrk {wrk_version()} (`-t1`, 5 s timeout)"
    return "benchmarks/loadgen.c (one request in flight per connection)"


def warmup_note(args: argparse.Namespace, samples: Sequence[Sample]) -> str:
    if getattr(args, "generator", "wrk") == "wrk":
        return (
            f"{args.warmup:g} s warm-up on fresh connections before each {args.duration:g} s "
            "measurement (its p99 includes the ramp while uvloop accepts the measurement's "
            "connections one per loop turn, weighted by wrk's correction for coordinated "
            "omission)"
        )
    ramps = [s.ramp_ms for s in samples if s.ramp_ms is not None and s.ramp_ms >= 0]
    unserved = sum(s.unserved for s in samples)
    return (
        f"each measurement opens its connections, warms up on them for {args.warmup:g} s and "
        "until every connection has had an answer, then measures "
        f"{args.duration:g} s on the same connections (the last connection's first answer came "
        f"{min(ramps, default=0):,.0f} to {max(ramps, default=0):,.0f} ms after the first connect"
        + (f"; {unserved} connections never answered" if unserved else "")
        + ")"
    )


def uvicorn_version() -> str:
    try:
        import uvicorn

        return str(uvicorn.__version__)
    except ImportError:
        return "?"


def wrk_version() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return "?"
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout
    words = out.split()
    return words[1] if len(words) > 1 else "?"


def machine() -> str:
    lscpu: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            name, _, value = line.partition(":")
            lscpu[name.strip()] = value.strip()
    cpu = lscpu.get("Model name", platform.processor() or "unknown CPU")
    cpus = lscpu.get("CPU(s)", str(os.cpu_count()))
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, {cpu}, {cpus} CPUs "
        f"({lscpu.get('Thread(s) per core', '?')} thread(s) per core), "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="seconds before each (0: none)")
    parser.add_argument("--connections", default="32,256")
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help="any of: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument(
        "--load-cpu", type=int, default=1, help="the generator's and redis-server's CPU"
    )
    parser.add_argument(
        "--generator",
        choices=("auto", "loadgen", "wrk"),
        default="auto",
        help="auto: benchmarks/loadgen.c when a C compiler is found (warm-up and measurement "
        "on the same connections, exact latencies), else wrk",
    )
    parser.add_argument(
        "--rt",
        action="store_true",
        help="run servers, generator and redis-server SCHED_RR (root), with the kernel's RT "
        "throttling off for the run (restored after)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() in every server after start-up (shorter full collections)",
    )
    parser.add_argument(
        "--gc-stats",
        action="store_true",
        help="count each server's garbage collections per generation over each measurement",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    # internal: one server process
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--gc-stats-file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.redis_url, args.gc_freeze, args.gc_stats_file)
        return
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        raise SystemExit("needs uvloop and httptools: pip install -e '.[dev]'") from None
    args.connections = [int(c) for c in args.connections.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",")]
    unknown = {v.removesuffix(COMPILED_SUFFIX) for v in args.variants if "@" not in v} - set(
        VARIANTS
    )
    if any(v.endswith(COMPILED_SUFFIX) for v in args.variants) and not COMPILED_PYTHON.exists():
        parser.error(f"{COMPILED_PYTHON} is missing: run `bash scripts/compiled.sh` first")
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")
    if "bare" not in args.variants:
        args.variants.insert(0, "bare")
    if args.no_pin:
        args.server_cpu = args.load_cpu = args.redis_cpu = None
    else:
        args.redis_cpu = args.load_cpu
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    samples = measure(args)
    if args.json:
        args.json.write_text(json.dumps([s.__dict__ for s in samples], indent=1))
    body = (
        f"Run {started} on {machine()}.\n\n"
        "`.venv/bin/python benchmarks/server.py` (needs `cc` or `wrk`, and `redis-server`; "
        f"options: `--help`). This run: `--rounds {args.rounds} --duration {args.duration:g} "
        f"--connections {','.join(map(str, args.connections))}"
        f"{' --gc-freeze' if args.gc_freeze else ''}{' --rt' if args.rt else ''} "
        f"--generator {args.generator}`.\n\n" + report(samples, args)
    )
    print(body)
    if not args.no_write:
        from benchmarks._results import write_section

        write_section("Under a real server (benchmarks/server.py)", body)


if __name__ == "__main__":
    main()
