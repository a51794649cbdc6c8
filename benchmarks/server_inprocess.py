"""uvicorn's own HTTP protocol driven in process: what a server runs per request, minus the kernel.

The apps are benchmarks/server.py's (`--variants`, Redis ones excepted). Each gets
32 `HttpToolsProtocol` connections (uvicorn's httptools protocol, as `uvicorn.run`
builds them) over a fake transport that only counts writes; a batch feeds one
`GET /hello` with `x-request-timeout-ms` to every connection, lets the event loop
(uvloop) run the request tasks to completion, and repeats. That executes the
server's Python per request (parsing callbacks, one task per request, the ASGI
cycle, header validation and serialization, keep-alive timers) but no socket,
syscall or load generator: on a shared machine it moves much less than
benchmarks/server.py, and it tells the middleware's cost under a server apart from
the kernel's share.

Reported per variant: median CPU µs per request (process CPU time), the median of
per-round paired differences and ratios against `bare`, and with `--count` the
bytecodes every Python frame executes per request (`sys.settrace` opcode events),
which do not depend on the machine's load.

    .venv/bin/python benchmarks/server_inprocess.py [--rounds 12] [--batch 6400]
        [--variants bare,noop,headers,fidelity-noheaders,fidelity-memory] [--count] [--no-write]

`--loopback` puts the kernel's share back in part: every response write also goes through
a loopback TCP pair and is read back, in the process, so the Python steps of a request run
between system calls, as under a server (the compiled build's lead over the pure one
shrinks there).

A variant `fidelity-memory@REV` runs FidelityMiddleware as of git revision REV (extracted
under another package name, as benchmarks/overhead.py `--baseline` does) beside the
working tree's, in the same rounds.

`--instructions` counts instead of timing: machine instructions per request in user space
(CPython, uvloop, httptools, a compiled build's extension modules), which no other load on
the machine moves. Each variant runs twice under `valgrind --tool=callgrind` (apt-get install
valgrind), with and without `--requests` more requests after the same warm-up, and the
difference is divided by them; hash randomisation is fixed, so both runs build the same
tables. A `VARIANT+compiled` there runs in .venv-compiled (the mypyc build).

    .venv/bin/python benchmarks/server_inprocess.py --instructions [--requests 6400]
        [--variants bare,headers,fidelity-memory,fidelity-memory+compiled]

With `--functions` it prints, per variant, its instructions per request beyond bare's (of
the same build) by function, each function's own (callgrind, not its callees'): the C
functions of the interpreter for a pure build, the compiled functions themselves (and the
runtime's generic operations they call) for a `+compiled` one.
FIDELITY_MW_COMPILED_PYTHON=<another venv's python> counts another revision's mypyc build.

`--layers` builds the default stack up one layer at a time (`LAYERS`: the frame, + the
deadline, + the route breaker, + a rate limit, + its RateLimit fields on the 200, + the
default telemetry observer without an OpenTelemetry SDK, + an SDK meter counting every
request with tracing off) and prints, per step, what it adds in instructions (callgrind,
as `--instructions`) and in Python calls, C calls and bytecodes (`sys.setprofile` /
`sys.settrace` over the same server, `COUNTED` requests), in the pure build and, with
`--builds pure,compiled` (.venv-compiled, `scripts/compiled.sh`), in the mypyc build too.
Counted under a compiled build, "Python calls" are the frames still interpreted
(uvicorn's, Starlette's, and ours that are not compiled). PYTHONPATH=<an older src/> counts
that revision in the pure build (the compiled runs ignore it).

    .venv/bin/python benchmarks/server_inprocess.py --layers [--builds pure,compiled]
        [--requests 3200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import server as served
from benchmarks._results import stamp, write_section

CONNECTIONS = 32
REQUEST = b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n" + (
    served.DEADLINE_HEADER.encode("latin-1") + b"\r\n\r\n"
)
DEFAULT = "bare,noop,headers,fidelity-noheaders,fidelity-memory"


class Loopback:
    """A connected TCP pair on 127.0.0.1: what a response write costs the kernel (`--loopback`)."""

    def __init__(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            self.out = socket.create_connection(listener.getsockname())
            self.into, _ = listener.accept()
        self.out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def carry(self, data: bytes) -> None:
        self.out.sendall(data)
        left = len(data)
        while left:
            left -= len(self.into.recv(left))

    def close(self) -> None:
        self.out.close()
        self.into.close()


class FakeTransport:
    """Just enough of an asyncio transport for uvicorn's protocol: writes are counted (and,
    with a `loopback`, sent through the kernel's TCP stack and read back, in the process)."""

    def __init__(self, port: int, loopback: Loopback | None = None) -> None:
        self.port = port
        self.writes = 0
        self.head = b""  # the last status line and headers written
        self.closing = False
        self.loopback = loopback

    def write(self, data: bytes) -> None:
        self.writes += 1
        if data.startswith(b"HTTP/"):
            self.head = data
        if self.loopback is not None:
            self.loopback.carry(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": (served.HOST, 8000), "peername": (served.HOST, self.port)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Server:
    """One variant's app behind `CONNECTIONS` uvicorn connections."""

    def __init__(self, variant: str, loopback: Loopback | None = None) -> None:
        from uvicorn.config import Config
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        from uvicorn.server import ServerState

        app = served.build_app(variant, "")
        config = Config(
            app=app,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level="warning",
            # armed and cancelled per request as usual, but a variant idle while the
            # others run must not have its connections closed
            timeout_keep_alive=3600,
        )
        config.load()
        self.state = ServerState()
        self.connections = []
        for i in range(CONNECTIONS):
            protocol = HttpToolsProtocol(config=config, server_state=self.state, app_state={})
            transport = FakeTransport(40000 + i, loopback)
            protocol.connection_made(transport)  # type: ignore[arg-type]
            self.connections.append((protocol, transport))

    async def run(self, requests: int) -> float:
        """CPU seconds per request over `requests` (rounded down to whole batches)."""
        batches = max(1, requests // CONNECTIONS)
        before = sum(t.writes for _, t in self.connections)
        start = time.process_time()
        for _ in range(batches):
            for protocol, _transport in self.connections:
                protocol.data_received(REQUEST)
            # the request tasks run until done; no event to wait on: they are the server's
            while self.state.tasks:  # noqa: ASYNC110
                await asyncio.sleep(0)
        elapsed = time.process_time() - start
        # a response is at least one write (start line + headers + body may be one)
        if sum(t.writes for _, t in self.connections) - before < batches * CONNECTIONS:
            raise RuntimeError("a request got no response")
        if any(t.closing for _, t in self.connections):
            raise RuntimeError("a connection was closed (an error response?)")
        return elapsed / (batches * CONNECTIONS)


async def count_bytecodes(variant: str, requests: int) -> float:
    """Bytecodes executed per request (every Python frame, uvicorn's and the app's)."""
    executed = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal executed
        frame.f_trace_opcodes = True
        if event == "opcode":
            executed += 1
        return tracer

    server = Server(variant)
    await server.run(requests)  # warm up
    batches = max(1, requests // CONNECTIONS)
    sys.settrace(tracer)
    try:
        await server.run(batches * CONNECTIONS)
    finally:
        sys.settrace(None)
    return executed / (batches * CONNECTIONS)


async def count_all(variants: list[str]) -> dict[str, float]:
    return {v: await count_bytecodes(v, 640) for v in variants}


async def measure(
    variants: list[str], rounds: int, batch: int, loopback: Loopback | None = None
) -> dict[str, list[float]]:
    servers = {v: Server(v, loopback) for v in variants}
    for server in servers.values():
        await server.run(batch // 2)  # warm up: middleware stacks built, caches filled
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            samples[v].append(await servers[v].run(batch))
        print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return samples


def report(
    samples: dict[str, list[float]],
    counts: dict[str, float],
    rounds: int,
    batch: int,
    loopback: bool = False,
) -> str:
    bare = samples["bare"]
    lines = [
        "| variant | median CPU µs/request | over bare (median of paired diffs) | ratio to bare"
        + (" | bytecodes/request (over bare) |" if counts else " |"),
        "|---|---:|---:|---:|" + ("---:|" if counts else ""),
    ]
    for name, values in samples.items():
        diffs = [v - b for v, b in zip(values, bare, strict=True)]
        ratios = [v / b for v, b in zip(values, bare, strict=True)]
        over = "—" if name == "bare" else f"{statistics.median(diffs) * 1e6:+.2f} µs"
        row = (
            f"| {name} | {statistics.median(values) * 1e6:.2f} | {over} "
            f"| {statistics.median(ratios):.3f} |"
        )
        if counts:
            extra = "" if name == "bare" else f" ({counts[name] - counts['bare']:+.0f})"
            row += f" {counts[name]:.0f}{extra} |"
        lines.append(row)
    for name in samples:
        if "@" in name and name.split("@")[0] in samples:
            mine = samples[name.split("@")[0]]
            diffs = [v - b for v, b in zip(mine, samples[name], strict=True)]
            ratios = [v / b for v, b in zip(mine, samples[name], strict=True)]
            lines.append(
                f"\n{name.split('@')[0]} vs {name}: {statistics.median(diffs) * 1e6:+.2f} µs "
                f"per request, {statistics.median(ratios):.3f} x (medians of per-round paired "
                "differences and ratios)."
            )
    lines += [
        "",
        f"{rounds} rounds x {batch} requests per variant (order reversed each round), process "
        f"CPU time; uvicorn's httptools protocol over a fake transport, {CONNECTIONS} "
        "connections, one task per request on uvloop, "
        + (
            "every response write also sent through a loopback TCP pair and read back (the "
            "kernel's work per write, counted in the process's CPU time). "
            if loopback
            else "no sockets: the server's Python without the kernel. "
        )
        + "Apps as in benchmarks/server.py (FidelityMiddleware: one permissive "
        "per-client limit, its default route breaker, a deadline from `x-request-timeout-ms`, "
        "memory state, telemetry off).",
    ]
    return "\n".join(lines)


WARMUP = 640  # requests before a counted run: middleware stacks built, caches filled


def run_one(variant: str, requests: int) -> int:
    """Serve `requests` requests of one variant after the warm-up (a callgrind run);
    returns the requests served (whole batches)."""
    import uvloop

    async def go() -> int:
        server = Server(variant)
        await server.run(WARMUP)
        if requests <= 0:
            return 0
        batches = max(1, requests // CONNECTIONS)
        await server.run(batches * CONNECTIONS)
        return batches * CONNECTIONS

    return uvloop.run(go())


def callgrind_total(text: str) -> int:
    """The instructions a callgrind output file counted (its `summary:` / `totals:` line)."""
    for line in text.splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError("no summary or totals line: not a callgrind output file")


def run_env(compiled: bool) -> dict[str, str]:
    """A counted run's environment: hash randomisation fixed; the compiled build's without
    PYTHONPATH (set to an older `src/` to count that revision in the pure build, it would
    shadow the installed wheel)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if compiled:
        env.pop("PYTHONPATH", None)
    return env


def callgrind_runs(variant: str, requests: int) -> tuple[str, str]:
    """The callgrind outputs of two runs of one variant: the warm-up alone, and the
    warm-up and `requests` more."""
    plain = variant.removesuffix(served.COMPILED_SUFFIX)
    python = sys.executable if plain == variant else str(served.COMPILED_PYTHON)
    texts = []
    for n in (0, requests):
        with tempfile.TemporaryDirectory(prefix="server-inprocess-cg-") as tmp:
            out = Path(tmp) / "callgrind.out"
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python]
            argv += [str(Path(__file__).resolve()), "--one", plain, "--requests", str(n)]
            subprocess.run(
                argv,
                env=run_env(plain != variant),
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            texts.append(out.read_text())
    return texts[0], texts[1]


def per_function(variant: str, requests: int) -> dict[str, float]:
    """Each function's own instructions per request (callgrind, not its callees')."""
    from benchmarks.outbound import callgrind_self

    without, with_requests = callgrind_runs(variant, requests)
    before, after = callgrind_self(without), callgrind_self(with_requests)
    n = max(1, requests // CONNECTIONS) * CONNECTIONS
    return {fn: (after.get(fn, 0) - before.get(fn, 0)) / n for fn in {*before, *after}}


def functions(variants: list[str], requests: int, top: int = 40) -> str:
    """Where each variant's instructions beyond bare's go, by function (its own
    instructions per request less bare's in the same build; `--functions`)."""
    runs = list(variants)
    for v in variants:
        base = "bare" + (served.COMPILED_SUFFIX if v.endswith(served.COMPILED_SUFFIX) else "")
        if base not in runs:
            runs.insert(0, base)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = dict(zip(runs, pool.map(lambda v: per_function(v, requests), runs), strict=True))
    lines: list[str] = []
    for v in variants:
        if v.removesuffix(served.COMPILED_SUFFIX) == "bare":
            continue
        base = found[
            "bare" + (served.COMPILED_SUFFIX if v.endswith(served.COMPILED_SUFFIX) else "")
        ]
        mine = found[v]
        diff = {fn: mine.get(fn, 0.0) - base.get(fn, 0.0) for fn in {*mine, *base}}
        total = sum(diff.values())
        rows = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]
        lines += [
            "",
            f"`{v}`: {total:+,.0f} instructions per request over bare, by function (own):",
        ]
        lines += ["", "```"] + [f"{d:+9,.0f}  {fn}" for fn, d in rows] + ["```"]
    return "\n".join(lines)


def count_instructions(variant: str, requests: int) -> float:
    """Instructions per request: a callgrind run with `requests` more than one without."""
    plain = variant.removesuffix(served.COMPILED_SUFFIX)
    python = sys.executable if plain == variant else str(served.COMPILED_PYTHON)
    totals = []
    for n in (0, requests):
        with tempfile.TemporaryDirectory(prefix="server-inprocess-cg-") as tmp:
            out = Path(tmp) / "callgrind.out"
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python]
            argv += [str(Path(__file__).resolve()), "--one", plain, "--requests", str(n)]
            subprocess.run(
                argv,
                env=run_env(plain != variant),
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            totals.append(callgrind_total(out.read_text()))
    batches = max(1, requests // CONNECTIONS)
    return (totals[1] - totals[0]) / (batches * CONNECTIONS)


def report_instructions(counts: dict[str, float], requests: int) -> str:
    bare = counts["bare"]
    lines = [
        "| variant | instructions/request | over bare | ratio to bare |",
        "|---|---:|---:|---:|",
    ]
    for name, value in counts.items():
        over = "—" if name == "bare" else f"{value - bare:+,.0f}"
        lines.append(f"| {name} | {value:,.0f} | {over} | {value / bare:.3f} |")
    lines += [
        "",
        f"callgrind, user space: each variant with and without {requests} requests after "
        f"the same {WARMUP}-request warm-up (PYTHONHASHSEED=0), the difference per request; "
        f"uvicorn's httptools protocol over a fake transport, {CONNECTIONS} connections, uvloop.",
    ]
    return "\n".join(lines)


# (variant, the variant it adds to, what it adds): the default stack built up one layer
# at a time (benchmarks/server.py builds each)
LAYERS = (
    ("fidelity-frame", "bare", "the frame: context, ContextVar, header scan, send wrapper"),
    ("fidelity-deadline", "fidelity-frame", "+ deadline: `x-request-timeout-ms` read, armed"),
    ("fidelity-breaker", "fidelity-deadline", "+ route breaker: gate, success recorded"),
    ("fidelity-noheaders", "fidelity-breaker", "+ rate limit: client key, GCRA"),
    ("fidelity-memory", "fidelity-noheaders", "+ RateLimit fields on the 200"),
    ("fidelity-telemetry", "fidelity-memory", "+ default observer, no OTel SDK set up"),
    ("fidelity-metrics", "fidelity-telemetry", "+ an SDK meter: counted, tracing off"),
)
COUNTED = 640  # requests counted by `--one-count` (after the warm-up)


def count_calls(variant: str, requests: int) -> dict[str, float]:
    """Python calls, C calls and bytecodes per request of one variant under uvicorn's
    protocol in process (this interpreter: run by the compiled build's for `+compiled`)."""
    import uvloop

    from benchmarks.callcount import Instructions, Profile

    async def go() -> dict[str, float]:
        server = Server(variant)
        await server.run(WARMUP)
        batches = max(1, requests // CONNECTIONS)
        n = batches * CONNECTIONS
        profile = Profile()
        sys.setprofile(profile)
        try:
            await server.run(n)
        finally:
            sys.setprofile(None)
        counter = Instructions()
        sys.settrace(counter)
        try:
            await server.run(n)
        finally:
            sys.settrace(None)
        return {
            "calls": profile.calls / n,
            "c_calls": profile.c_calls / n,
            "bytecodes": counter.count / n,
        }

    return uvloop.run(go())


def count_calls_in(variant: str, requests: int) -> dict[str, float]:
    """`count_calls` in a process of its own, by the build the variant names."""
    import json

    plain = variant.removesuffix(served.COMPILED_SUFFIX)
    python = sys.executable if plain == variant else str(served.COMPILED_PYTHON)
    argv = [python, str(Path(__file__).resolve()), "--one-count", plain]
    argv += ["--requests", str(requests)]
    out = subprocess.run(
        argv, env=run_env(plain != variant), check=True, capture_output=True
    ).stdout
    counts: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return counts


def layers(builds: list[str], requests: int) -> str:
    """The layer table (`--layers`) in each build named ("pure", "compiled")."""
    names = ["bare", *(name for name, _, _ in LAYERS)]
    runs = [
        (name if build == "pure" else name + served.COMPILED_SUFFIX)
        for build in builds
        for name in names
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = list(pool.map(lambda v: count_instructions(v, requests), runs))
        calls = list(pool.map(lambda v: count_calls_in(v, COUNTED), runs))
    ins = dict(zip(runs, found, strict=True))
    cnt = dict(zip(runs, calls, strict=True))

    def key(name: str, build: str) -> str:
        return name if build == "pure" else name + served.COMPILED_SUFFIX

    head = "| step | " + " | ".join(
        f"instructions {b} (over bare) | Python calls {b} | C calls {b} | bytecodes {b}"
        for b in builds
    )
    lines = [head + " |", "|---|" + "---:|" * (4 * len(builds))]
    for build_row in [("bare", None, "bare route")] + [(n, b, w) for n, b, w in LAYERS]:
        name, before, what = build_row
        cells = []
        for b in builds:
            mine, base = ins[key(name, b)], ins[key("bare", b)]
            c = cnt[key(name, b)]
            if before is None:
                cells += [f"{mine:,.0f}", f"{c['calls']:.1f}", f"{c['c_calls']:.1f}",
                          f"{c['bytecodes']:,.0f}"]  # fmt: skip
                continue
            prev, pc = ins[key(before, b)], cnt[key(before, b)]
            cells += [
                f"{mine - prev:+,.0f} ({mine - base:+,.0f})",
                f"{c['calls'] - pc['calls']:+.1f}",
                f"{c['c_calls'] - pc['c_calls']:+.1f}",
                f"{c['bytecodes'] - pc['bytecodes']:+,.0f}",
            ]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each step against the row above it (instructions also against bare, in brackets). "
        f"Instructions: callgrind, user space, {requests} requests after a {WARMUP}-request "
        "warm-up less the same run without them, per request (PYTHONHASHSEED=0). Calls and "
        f"bytecodes: `sys.setprofile` / `sys.settrace` over {COUNTED} requests after the "
        "warm-up. uvicorn's httptools protocol over a fake transport, "
        f"{CONNECTIONS} connections, uvloop; one permissive per-client limit, memory state "
        "(benchmarks/server.py's apps).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch", type=int, default=6400)
    parser.add_argument("--variants", default=DEFAULT)
    parser.add_argument("--count", action="store_true", help="also count bytecodes per request")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request with callgrind instead of timing (print only)",
    )
    parser.add_argument("--requests", type=int, default=6400, help="with --instructions")
    parser.add_argument(
        "--loopback",
        action="store_true",
        help="send every response write through a loopback TCP pair and read it back: the "
        "kernel's work per response between the server's Python steps (timed, as CPU time)",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="the default stack one layer at a time, in instructions and calls (print only)",
    )
    parser.add_argument(
        "--builds", default="pure", help="with --layers: pure, compiled or pure,compiled"
    )
    parser.add_argument(
        "--functions",
        action="store_true",
        help="with --instructions: each variant's instructions over bare by function (own)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a callgrind run of one variant
    parser.add_argument("--one-count", help=argparse.SUPPRESS)  # calls of one variant
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.requests)
        return
    if args.one_count:
        import json

        print(json.dumps(count_calls(args.one_count, args.requests)))
        return
    if args.layers:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind not found (Debian package valgrind)")
        builds = [b.strip() for b in args.builds.split(",")]
        if not builds or not set(builds) <= {"pure", "compiled"}:
            parser.error("--builds: pure, compiled or both")
        print(layers(builds, args.requests))
        return
    variants = [v.strip() for v in args.variants.split(",")]
    bad = [
        v
        for v in variants
        if "@" not in v
        and (
            (v.removesuffix(served.COMPILED_SUFFIX) if args.instructions else v)
            not in served.VARIANTS
            or v in served.REDIS_VARIANTS
        )
    ]
    if bad:
        parser.error(f"not an in-process variant: {bad}")
    if "bare" not in variants and not args.functions:
        variants.insert(0, "bare")
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind not found (Debian package valgrind)")
        if args.functions:
            print(functions(variants, args.requests))
            return
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            found = pool.map(lambda v: count_instructions(v, args.requests), variants)
            counts = dict(zip(variants, found, strict=True))
        print(report_instructions(counts, args.requests))
        return
    import uvloop

    counts = uvloop.run(count_all(variants)) if args.count else {}
    loopback = Loopback() if args.loopback else None
    try:
        samples = uvloop.run(measure(variants, args.rounds, args.batch, loopback))
    finally:
        if loopback is not None:
            loopback.close()
    table = report(samples, counts, args.rounds, args.batch, args.loopback)
    print(table)
    if not args.no_write:
        write_section(
            "uvicorn's protocol in process (benchmarks/server_inprocess.py)",
            f"{stamp()}\n\n{table}",
        )


if __name__ == "__main__":
    main()
