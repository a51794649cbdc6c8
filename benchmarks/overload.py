"""Overload: a CPU-bound service offered 1x, 2x and 4x its capacity, with and without a bulkhead.

The service (one uvicorn worker, pinned to one core) answers GET /work by
awaiting a short simulated I/O wait and then burning `--cpu-ms` of CPU, so
requests in flight share the core and each one's latency grows with their
number. The load generator (pinned to the other core) sends requests at a
fixed rate whatever the answers (open loop) over raw keep-alive connections
(a few microseconds of client CPU per request, so the generator is never the
bottleneck; its own lateness is reported), each with a `--timeout-s` total
timeout, so an overloaded service shows up as growing latency and timeouts,
not as a politely slower client. Latency is measured from when a request was
due, not from when the generator got round to it.

Variants, measured in alternating order at each offered rate:
  none       no limiter: every request is admitted
  fixed      FidelityMiddleware with a fixed bulkhead ([concurrency] limit = --fixed-limit)
  adaptive   FidelityMiddleware with the adaptive limit ([concurrency] adaptive = true;
             its default admits the newest of each loop turn: newest_first unset)
  fifo       the adaptive limit first come, first served (newest_first = false)
  newest     the adaptive limit with newest_first = true set (the default's behaviour)
  stale      the adaptive limit that also sheds requests that waited too long to be read
             (shed_stale = true): latency first
  fixed=N    (highest rate only, --oracle) fixed limits swept: the frontier of what any
             static limit achieves, against which the adaptive one is judged
  NAME@k=v/..  a variant with settings of its own (`SETTINGS`), e.g. `stale@tol=2`
             or `stale@tol=1.75/pace_ms=0.5`: sweeps in one run, rounds interleaved

Per measurement: goodput (200s completed inside the window, per second, and as
a share of capacity), p50 and p99 latency of the 200s over the whole run and
over the steady state (after `--settle` s; the first seconds are reported as
the transient, not hidden), the shed share (503s), and timeouts/errors.
Every round first calibrates on the unlimited service: capacity is the
goodput of a closed loop that keeps the service busy, the unloaded p99 that
of one request at a time; each is the best of three short runs, since other
work on the machine can only lower capacity and raise latency. Each run
measures how long the server and the generator waited for their cores
(schedstat run delay) and is redone when that passed `--max-stolen`.

    .venv/bin/python benchmarks/overload.py [--cpu-ms 8] [--duration 6] [--rounds 3]
        [--multiples 1,2,4] [--variants none,fixed,adaptive,stale] [--oracle 1,2,3] [--timeline]
        [--components] [--no-write]

The machine is shared: run it under `nice -n -15` (as root) for usable numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import stamp, write_section

VARIANTS = ("none", "fixed", "adaptive", "fifo", "stale", "newest")
# A variant's own settings (`--variants stale@tol=2/pace_ms=0.5`): `tol` is the policy's
# tolerance; the others set the library's constants in the server process, to sweep them.
SETTINGS = {
    "tol": "[concurrency] tolerance (default: --tolerance)",
    "min": "[concurrency] min_limit (default 1)",
    "max": "[concurrency] max_limit (default 500; min=2/max=2 pins the adaptive limit at 2)",
    "pace_ms": "decide.concurrency.PACE_S, the shortest pacing turn (1 ms)",
    "res_ms": "decide.concurrency.STALE_RESOLUTION_S, the finest stale bound (2 ms)",
    "fade": "decide.concurrency.LAG_FADE, the lag peak's fade per release (0.99)",
    "tick_ms": "inbound.bulkhead.LoopClock.TICK_S, the heartbeat (1 ms)",
    "doubt": "decide.concurrency.DOUBT_SAMPLES, the fewest slow samples in a row that replace"
    " a stale floor early (10; a huge number turns that off, to measure it paired)",
    "passes": "inbound.bulkhead.Turn.READ_PASSES, the passes a turn waits for arrivals read"
    " with its first (1)",
    "busy": "decide.concurrency.BUSY_SHARE, the loop share newest_first's busy floor keeps"
    " busy (0.9; 0 turns the floor off)",
}

APP_SOURCE = """
import asyncio, contextlib, os, time
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

CPU_S = float(os.environ["OVERLOAD_CPU_MS"]) / 1000.0
IO_S = float(os.environ["OVERLOAD_IO_MS"]) / 1000.0

EVENTS = os.environ.get("OVERLOAD_EVENTS")
STAMPS = {}  # --components: request id -> [read by the app, CPU start, CPU end]

async def work(request):
    await asyncio.sleep(IO_S)
    start = time.perf_counter()
    end = start + CPU_S
    while time.perf_counter() < end:
        pass
    if EVENTS:
        STAMPS[request.scope["query_string"]] += (start, time.perf_counter())
    return PlainTextResponse("ok")

AT_EXIT = []

@contextlib.asynccontextmanager
async def lifespan(app):
    yield
    for hook in AT_EXIT:
        hook()

app = Starlette(routes=[Route("/work", work)], lifespan=lifespan)
variant = os.environ["OVERLOAD_VARIANT"]
if variant.partition("@")[0] != "none":
    from fidelity_mw import FidelityMiddleware, Policy
    from fidelity_mw.policy import ConcurrencyConfig

    # --variants NAME@key=value/...: this variant's own settings (SETTINGS in overload.py)
    base, _, extra = variant.partition("@")
    settings = dict(item.split("=", 1) for item in extra.split("/") if item)
    tolerance = float(settings.pop("tol", os.environ["OVERLOAD_TOLERANCE"]))
    min_limit = int(settings.pop("min", "1"))
    max_limit = int(settings.pop("max", "500"))
    if settings:
        import fidelity_mw.decide.concurrency as decide
        from fidelity_mw.inbound.bulkhead import LoopClock

        for key, value in settings.items():
            if key == "pace_ms":
                decide.PACE_S = float(value) / 1000.0
            elif key == "res_ms":
                decide.STALE_RESOLUTION_S = float(value) / 1000.0
            elif key == "fade":
                decide.LAG_FADE = float(value)
            elif key == "tick_ms":
                LoopClock.TICK_S = float(value) / 1000.0
            elif key == "doubt":
                decide.DOUBT_SAMPLES = int(value)
            elif key == "passes":
                from fidelity_mw.inbound.bulkhead import Turn

                Turn.READ_PASSES = int(value)
            elif key == "busy":
                decide.BUSY_SHARE = float(value)
            else:
                raise SystemExit(f"overload: unknown variant setting {key!r}")
    if base.startswith("fixed"):
        conc = ConcurrencyConfig(limit=int(os.environ["OVERLOAD_FIXED_LIMIT"]))
    else:
        start = min(max(int(os.environ["OVERLOAD_ADAPTIVE_START"]), min_limit), max_limit)
        conc = ConcurrencyConfig(limit=start,
                                 adaptive=True, max_limit=max_limit, min_limit=min_limit,
                                 tolerance=tolerance,
                                 shed_stale=base == "stale",
                                 # adaptive: the library's default (newest first);
                                 # fifo: first come, first served
                                 newest_first={"newest": True, "fifo": False}.get(base))
    policy = Policy(concurrency=conc, breaker=None, rate_limits=())
    app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)

    trace_path = os.environ.get("OVERLOAD_TRACE")
    if trace_path and base in ("adaptive", "fifo", "stale", "newest"):
        # --timeline: every latency sample and the limit after it, written at exit
        from fidelity_mw.decide.concurrency import GradientEstimate

        samples = []
        sample = GradientEstimate.sample

        def traced(self, latency_s, in_flight, *more):
            limit = sample(self, latency_s, in_flight, *more)
            samples.append((time.perf_counter(), latency_s, in_flight, limit))
            return limit

        GradientEstimate.sample = traced

        def dump():
            with open(trace_path, "w") as f:
                f.writelines(f"{t:.6f} {lat:.6f} {n} {lim:.3f}\\n" for t, lat, n, lim in samples)

        AT_EXIT.append(dump)

if EVENTS:
    # Outside the middleware: when the server handed the request to the app at all.
    inner = app

    async def app(scope, receive, send):
        if scope["type"] == "http":
            STAMPS[scope["query_string"]] = [time.perf_counter()]
        await inner(scope, receive, send)

    def dump_events():
        with open(EVENTS, "w") as f:
            for key, stamps in STAMPS.items():
                if key:
                    f.write(key.decode() + " " + " ".join(f"{t:.6f}" for t in stamps) + "\\n")

    AT_EXIT.append(dump_events)
"""

REQUEST = b"GET /work HTTP/1.1\r\nHost: overload\r\n\r\n"


@dataclass
class Result:
    variant: str
    multiple: float
    offered: float
    duration_s: float = 0.0
    settle_s: float = 0.0
    t0: float = 0.0  # perf_counter at the start of the measurement
    stolen: float = 0.0  # share of the run the server or the generator waited for its core
    busy: float = 0.0  # share of the run the server ran on its core (schedstat run time)
    attempts: int = 1
    trace: list[tuple[float, float, int, float]] = field(default_factory=list)
    sent: int = 0
    ok: int = 0
    shed: int = 0
    failed: int = 0
    # (due offset, completion offset, latency) of every 200
    served: list[tuple[float, float, float]] = field(default_factory=list)
    shed_at: list[float] = field(default_factory=list)
    # --components: request id -> (due, completion, status), and the server's stamps
    by_id: dict[int, tuple[float, float, int]] = field(default_factory=dict)
    stamps: dict[int, list[float]] = field(default_factory=dict)
    lateness: list[float] = field(default_factory=list)  # the generator's own

    @property
    def goodput(self) -> float:
        done = sum(1 for _due, end, _lat in self.served if end <= self.duration_s)
        return done / self.duration_s if self.duration_s else 0.0

    def latencies(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return sorted(lat for due, _end, lat in self.served if since <= due < until)

    def pct(self, q: float, since: float = 0.0) -> float:
        return _pct(self.latencies(since), q)


def _pct(data: list[float], q: float) -> float:
    if not data:
        return float("nan")
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
def serve(variant: str, args: argparse.Namespace, app_dir: Path) -> Iterator[tuple[int, int]]:
    port = _free_port()
    env = dict(
        os.environ,
        OVERLOAD_VARIANT=variant,
        OVERLOAD_CPU_MS=str(args.cpu_ms),
        OVERLOAD_IO_MS=str(args.io_ms),
        OVERLOAD_FIXED_LIMIT=variant[6:] if variant.startswith("fixed=") else str(args.fixed_limit),
        OVERLOAD_ADAPTIVE_START=str(args.adaptive_start),
        OVERLOAD_TOLERANCE=str(args.tolerance),
        OVERLOAD_TRACE=str(app_dir / "trace.txt") if args.timeline else "",
        OVERLOAD_EVENTS=str(app_dir / "events.txt") if args.components else "",
        PYTHONPATH=f"{app_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    cmd = [
        *_pin(0),
        *(["chrt", "-r", "1"] if args.rt else []),
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
        "--loop",
        args.loop,
    ]
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _ = asyncio.run(_probe(port))
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{variant}: server did not start")
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


async def _probe(port: int) -> tuple[int, None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await _exchange(reader, writer), None
    finally:
        writer.close()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes = REQUEST
) -> int:
    """One request on a keep-alive connection; the status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError("no content-length")
    length = int(head[at + 17 : head.index(b"\r\n", at + 2)])
    if length:
        await reader.readexactly(length)
    return status


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Client:
    """Raw HTTP/1.1 over a pool of keep-alive connections (at most `max_conns`)."""

    def __init__(self, port: int, max_conns: int) -> None:
        self.port = port
        self.max_conns = max_conns
        self.idle: list[Conn] = []
        self.open = 0

    async def warm(self, n: int) -> None:
        for _ in range(n):
            self.idle.append(await asyncio.open_connection("127.0.0.1", self.port))
            self.open += 1

    async def get(self, timeout_s: float, request: bytes = REQUEST) -> int:
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            if self.open >= self.max_conns:
                raise ConnectionError("client connection bound reached")
            self.open += 1
        try:
            async with asyncio.timeout(timeout_s):
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                status = await _exchange(*conn, request)
        except BaseException:
            self.open -= 1
            if conn is not None:
                conn[1].close()
            raise
        self.idle.append(conn)
        return status

    def close(self) -> None:
        for _reader, writer in self.idle:
            writer.close()


async def _timed(
    client: Client, res: Result, t0: float, due: float, timeout_s: float, rid: int | None = None
) -> None:
    request = REQUEST if rid is None else b"GET /work?%d HTTP/1.1\r\nHost: overload\r\n\r\n" % rid
    try:
        status = await client.get(timeout_s - (time.perf_counter() - due), request)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        res.failed += 1
        return
    end = time.perf_counter()
    if rid is not None:
        res.by_id[rid] = (due - t0, end - t0, status)
    if status == 200:
        res.ok += 1
        res.served.append((due - t0, end - t0, end - due))
    elif status == 503:
        res.shed += 1
        res.shed_at.append(due - t0)
    else:
        res.failed += 1


async def open_loop(
    port: int, res: Result, timeout_s: float, max_conns: int, ids: bool = False
) -> None:
    client = Client(port, max_conns)
    await client.warm(32)
    rate = res.offered
    n = int(rate * res.duration_s)
    tasks = []
    t0 = res.t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        res.lateness.append(max(0.0, time.perf_counter() - due))
        rid = i if ids else None
        tasks.append(asyncio.create_task(_timed(client, res, t0, due, timeout_s, rid)))
    res.sent = n
    await asyncio.gather(*tasks)
    client.close()


async def closed_loop(port: int, workers: int, duration_s: float) -> Result:
    res = Result("calibration", 0, 0, duration_s=duration_s)
    client = Client(port, workers)
    await client.warm(workers)
    t0 = time.perf_counter()
    stop = t0 + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop:
            await _timed(client, res, t0, time.perf_counter(), 10.0)

    await asyncio.gather(*(worker() for _ in range(workers)))
    client.close()
    return res


@dataclass
class Calibration:
    capacity: float
    unloaded_p50: float
    unloaded_p99: float


def run_delay(pid: int | str = "self") -> float:
    """Seconds the process's main thread has spent runnable but waiting for a CPU."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def run_time(pid: int | str = "self") -> float:
    """Seconds the process's main thread has spent on a CPU."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(
    variant: str, multiple: float, cal: Calibration, args: argparse.Namespace, app_dir: Path
) -> Result:
    """One open-loop run; repeated (up to --attempts) while another process took the
    server's or the generator's core from it for more than --max-stolen of the run."""
    best: Result | None = None
    for attempt in range(args.attempts):
        res = Result(variant, multiple, cal.capacity * multiple, args.duration, args.settle)
        with serve(variant, args, app_dir) as (port, pid):
            server0, gen0, ran0 = run_delay(pid), run_delay(), run_time(pid)
            began = time.perf_counter()
            asyncio.run(open_loop(port, res, args.timeout_s, args.max_conns, args.components))
            res.stolen = max(run_delay(pid) - server0, run_delay() - gen0) / args.duration
            # (over the whole run, the drain after the last request included)
            res.busy = (run_time(pid) - ran0) / (time.perf_counter() - began)
        res.attempts = attempt + 1
        if args.timeline:
            res.trace = read_trace(app_dir / "trace.txt", res.t0)
        if args.components:
            res.stamps = read_stamps(app_dir / "events.txt", res.t0)
        if best is None or res.stolen < best.stolen:
            best = res
        if res.stolen <= args.max_stolen:
            break
    assert best is not None
    best.attempts = args.attempts if best.stolen > args.max_stolen else best.attempts
    return best


def calibrate(args: argparse.Namespace, app_dir: Path) -> Calibration:
    with serve("none", args, app_dir) as (port, _pid):
        asyncio.run(closed_loop(port, 4, 0.5))  # warm the process up
        caps = [asyncio.run(closed_loop(port, 4, 1.5)).goodput for _ in range(3)]
        ones = [asyncio.run(closed_loop(port, 1, 1.0)).latencies() for _ in range(3)]
    # Another process on the machine can only lower capacity and raise latency: the
    # best run of each is the least disturbed (and the strictest yardstick).
    quiet = min(ones, key=lambda lat: _pct(lat, 0.99))
    cal = Calibration(max(caps), _pct(quiet, 0.5), _pct(quiet, 0.99))
    print(
        f"calibration: capacity {cal.capacity:.0f} req/s (runs "
        f"{', '.join(f'{c:.0f}' for c in caps)}), unloaded p50 {cal.unloaded_p50 * 1000:.1f} ms, "
        f"p99 {cal.unloaded_p99 * 1000:.1f} ms",
        file=sys.stderr,
    )
    return cal


def timeline(res: Result, step: float, trace: list[tuple[float, float, int, float]]) -> str:
    rows = []
    t = 0.0
    while t < res.duration_s:
        lat = res.latencies(t, t + step)
        shed = sum(1 for s in res.shed_at if t <= s < t + step)
        row = (
            f"    {t:4.1f}-{t + step:4.1f}s  served {len(lat):4d}  shed {shed:4d}  "
            f"p50 {_pct(lat, 0.5) * 1000:6.1f}  p99 {_pct(lat, 0.99) * 1000:7.1f}  "
            f"max {(lat[-1] if lat else float('nan')) * 1000:7.1f} ms"
        )
        window = [x for x in trace if t <= x[0] < t + step]
        if window:
            inside = sorted(x[1] for x in window)
            limits = sorted(x[3] for x in window)
            row += (
                f" | in-app p50 {_pct(inside, 0.5) * 1000:5.1f} p99 "
                f"{_pct(inside, 0.99) * 1000:5.1f} ms, limit {limits[0]:.1f}.."
                f"{limits[-1]:.1f} (median {_pct(limits, 0.5):.1f})"
            )
        rows.append(row)
        t += step
    return "\n".join(rows)


def read_trace(path: Path, t0: float) -> list[tuple[float, float, int, float]]:
    """The server's samples (perf_counter is the same clock in both processes)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        t, lat, n, lim = line.split()
        rows.append((float(t) - t0, float(lat), int(n), float(lim)))
    path.unlink()
    return rows


def read_stamps(path: Path, t0: float) -> dict[int, list[float]]:
    if not path.exists():
        return {}
    stamps = {}
    for line in path.read_text().splitlines():
        rid, *times = line.split()
        stamps[int(rid)] = [float(t) - t0 for t in times]
    path.unlink()
    return stamps


def components(res: Result) -> str:
    """Where a served request's time went (steady state), and a shed one's wait to be read.

    read: from when it was due until the server handed it to the app (waiting in
    the socket while the loop was busy, then parsing); before CPU: in the app
    (middleware, its await, then waiting for the core); CPU: its own burn; after:
    from the burn's end until the generator had the answer.
    """
    parts: dict[str, list[float]] = {"read": [], "before CPU": [], "CPU": [], "after": []}
    shed_read = []
    for rid, (due, end, status) in res.by_id.items():
        stamps = res.stamps.get(rid)
        if due < res.settle_s or not stamps:
            continue
        if status == 200 and len(stamps) == 3:
            seen, start, stop = stamps
            values = (seen - due, start - seen, stop - start, end - stop)
            for name, value in zip(parts, values, strict=True):
                parts[name].append(value)
        elif status == 503:
            shed_read.append(stamps[0] - due)
    rows = []
    for name, values in parts.items():
        values.sort()
        p50, p90, p99 = (_pct(values, q) * 1000 for q in (0.5, 0.9, 0.99))
        rows.append(f"    {name:10} p50 {p50:5.1f}  p90 {p90:5.1f}  p99 {p99:5.1f} ms")
    shed_read.sort()
    rows.append(
        f"    (shed: read p50 {_pct(shed_read, 0.5) * 1000:.1f}, p99 "
        f"{_pct(shed_read, 0.99) * 1000:.1f} ms)"
    )
    return "\n".join(rows)


def _variants(spec: str) -> list[str]:
    """The variants named, each NAME or NAME@key=value/... (a name of VARIANTS)."""
    out = []
    for variant in spec.split(","):
        base, _, extra = variant.partition("@")
        if base not in VARIANTS:
            raise SystemExit(f"overload: unknown variant {base!r} (one of {', '.join(VARIANTS)})")
        for item in extra.split("/") if extra else ():
            key, eq, _value = item.partition("=")
            if not eq or key not in SETTINGS:
                raise SystemExit(
                    f"overload: bad setting {item!r} in {variant!r} (keys: {', '.join(SETTINGS)})"
                )
        out.append(variant)
    return out


def uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-ms", type=float, default=8.0)
    parser.add_argument("--io-ms", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--settle", type=float, default=1.0, help="transient excluded from p99")
    parser.add_argument("--timeout-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--multiples", default="1,2,4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--fixed-limit", type=int, default=8)
    parser.add_argument(
        "--oracle",
        default="1,2,3",
        help="fixed limits also measured at the highest multiple: the best any static limit "
        "does, the frontier the adaptive limit is judged against ('' for none)",
    )
    parser.add_argument("--adaptive-start", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=1.5, help="the adaptive limit's")
    parser.add_argument("--max-conns", type=int, default=2000)
    parser.add_argument(
        "--rt",
        action="store_true",
        help="run server and generator SCHED_RR (root), with the kernel's RT throttling off "
        "for the run (restored after)",
    )
    parser.add_argument("--attempts", type=int, default=3, help="per run, on a busy machine")
    parser.add_argument(
        "--max-stolen",
        type=float,
        default=0.02,
        help="share of a run the server or generator may wait for its core before it is redone",
    )
    parser.add_argument("--timeline", action="store_true", help="served latency per 0.5 s")
    parser.add_argument(
        "--components",
        action="store_true",
        help="where served requests' time goes: waiting to be read, in the app before "
        "their CPU, CPU, after (the server stamps each request; adds ids to the requests)",
    )
    parser.add_argument(
        "--loop", default="auto", help="uvicorn's event loop: auto (uvloop if installed), asyncio"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    multiples = [float(m) for m in args.multiples.split(",")]
    variants = tuple(_variants(args.variants))
    oracle = tuple(f"fixed={n}" for n in args.oracle.split(",") if n)

    app_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fidelity-overload-{os.getpid()}"
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "overload_app.py").write_text(APP_SOURCE)
    if _pin(1):
        os.sched_setaffinity(0, {1})
    load_before = uptime()
    nice = os.nice(0)
    with _rt_unthrottled(args.rt) as throttling:
        if args.rt:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
        _run(args, multiples, variants, oracle, app_dir, load_before, nice, throttling)


RT_RUNTIME = Path("/proc/sys/kernel/sched_rt_runtime_us")


@contextlib.contextmanager
def _rt_unthrottled(rt: bool) -> Iterator[str]:
    """Under `--rt`, the kernel's RT throttling off while the benchmark runs (root only).

    With `sched_rt_runtime_us` at its default 950000, a SCHED_RR server busy for more
    than 95 % of a second is stopped for the rest of it: at overload that is a ~50 ms
    stall every second, which alone puts the p99 of a 10 ms service at 65 ms. The old
    value comes back in the `finally`, also on Ctrl-C or SIGTERM. Yields the report's
    note on it."""
    if not rt:
        yield ""
        return
    try:
        old = RT_RUNTIME.read_text().strip()
    except OSError:
        yield "; RT throttling unknown (no sched_rt_runtime_us)"
        return
    if old == "-1":
        yield "; RT throttling was already off (sched_rt_runtime_us -1)"
        return
    try:
        RT_RUNTIME.write_text("-1")
    except OSError:  # not root: as the kernel has it
        yield f"; RT throttling on (sched_rt_runtime_us {old}: not root, left alone)"
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield f"; RT throttling off for the run (sched_rt_runtime_us -1, restored to {old})"
    finally:
        RT_RUNTIME.write_text(old)
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # (unwinds through the `finally` that restores)


def _run(
    args: argparse.Namespace,
    multiples: list[float],
    variants: tuple[str, ...],
    oracle: tuple[str, ...],
    app_dir: Path,
    load_before: str,
    nice: int,
    throttling: str,
) -> None:
    cals: list[Calibration] = []
    results: list[tuple[Result, Calibration]] = []
    for rnd in range(args.rounds):
        cal = calibrate(args, app_dir)
        cals.append(cal)
        for multiple in multiples:
            here = variants + oracle if multiple == max(multiples) else variants
            order = here if (rnd + int(multiple)) % 2 == 0 else tuple(reversed(here))
            for variant in order:
                res = measure(variant, multiple, cal, args, app_dir)
                late = sorted(res.lateness)
                print(
                    f"r{rnd} {variant:9} x{multiple:g}: goodput {res.goodput:.0f}/s "
                    f"({res.goodput / cal.capacity:.0%}), p50 {res.pct(0.5) * 1000:.0f} ms, "
                    f"p99 {res.pct(0.99) * 1000:.0f} ms (steady "
                    f"{res.pct(0.99, args.settle) * 1000:.0f} ms), shed {res.shed}, "
                    f"failed {res.failed}; generator late p99 {_pct(late, 0.99) * 1000:.1f} ms; "
                    f"core stolen {res.stolen:.1%} (attempt {res.attempts}); server busy "
                    f"{res.busy:.0%}",
                    file=sys.stderr,
                )
                if args.timeline:
                    print(timeline(res, 0.5, res.trace), file=sys.stderr)
                if args.components:
                    print(components(res), file=sys.stderr)
                results.append((res, cal))
    load_after = uptime()

    capacity = statistics.median(c.capacity for c in cals)
    unloaded_p99 = statistics.median(c.unloaded_p99 for c in cals)
    lines = [
        stamp(),
        "",
        f"`nice -n {nice}`{', SCHED_RR' if args.rt else ''}{throttling}; load average "
        f"(1, 5, 15 min) "
        f"{load_before} before, {load_after} after. Service: one uvicorn worker pinned to "
        f"core 0; each request awaits "
        f"{args.io_ms:g} ms then burns {args.cpu_ms:g} ms of CPU. Open-loop load (raw "
        f"keep-alive HTTP/1.1) from the other core, {args.duration:g} s per measurement, "
        f"timeout {args.timeout_s:g} s; {args.rounds} round(s), each calibrated on the "
        f"unlimited service, variants in alternating order; medians over rounds. Capacity "
        f"(closed loop of 4, best of 3 runs): **{capacity:.0f} req/s** (rounds: "
        f"{', '.join(f'{c.capacity:.0f}' for c in cals)}); unloaded p99 (one at a time, "
        f"lowest of 3 runs): "
        f"**{unloaded_p99 * 1000:.1f} ms** (rounds: "
        f"{', '.join(f'{c.unloaded_p99 * 1000:.1f}' for c in cals)}). Fixed bulkhead: limit "
        f"{args.fixed_limit}; adaptive: starts at {args.adaptive_start}, tolerance "
        f"{args.tolerance:g}; stale: the same with `shed_stale = true`; fifo: "
        f"`newest_first = false`; newest: `newest_first = true`; `fixed=N` rows "
        f"(highest multiple only): static limits swept, "
        f"the best a limit that knew the answer could do. Each p99 is divided "
        f"by its own round's unloaded p99. Steady p99: requests due after the first "
        f"{args.settle:g} s; whole-run p99 includes that transient. Core stolen: the share "
        f"of the run the server or the generator waited for its core (schedstat run delay); "
        f"a run over {args.max_stolen:.0%} was redone, up to {args.attempts} times. Server busy: "
        f"the share of the run (until its last answer) the server ran on its core.",
        "",
        "| offered | variant | goodput | of capacity | p50 | p99 (whole run) | p99 steady "
        "| steady p99 / unloaded | shed (503) | timeouts/errors | core stolen | server busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for multiple in multiples:
        for variant in variants + oracle:
            runs = [(r, c) for r, c in results if r.variant == variant and r.multiple == multiple]
            if not runs:
                continue
            good = statistics.median(r.goodput / c.capacity for r, c in runs)
            goodput = statistics.median(r.goodput for r, _c in runs)
            p50 = statistics.median(r.pct(0.5) for r, _c in runs)
            p99 = statistics.median(r.pct(0.99) for r, _c in runs)
            steady = statistics.median(r.pct(0.99, args.settle) for r, _c in runs)
            ratio = statistics.median(r.pct(0.99, args.settle) / c.unloaded_p99 for r, c in runs)
            shed = statistics.median(r.shed / max(1, r.sent) for r, _c in runs)
            failed = statistics.median(r.failed / max(1, r.sent) for r, _c in runs)
            stolen = statistics.median(r.stolen for r, _c in runs)
            busy = statistics.median(r.busy for r, _c in runs)
            lines.append(
                f"| {multiple:g}x | {variant} | {goodput:.0f}/s | {good:.0%} | "
                f"{p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms | {steady * 1000:.0f} ms | "
                f"{ratio:.1f}x | {shed:.0%} | {failed:.0%} | {stolen:.1%} | {busy:.0%} |"
            )
    shutil.rmtree(app_dir, ignore_errors=True)
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Overload: bulkheads at 1x, 2x and 4x capacity (`overload.py`)", body)


if __name__ == "__main__":
    main()
