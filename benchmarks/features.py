"""What each feature of FidelityMiddleware costs per request, in process, in both builds.

The apps are benchmarks/overhead.py's (a Starlette app with one route, called directly as
ASGI, no server; the same request with `x-request-timeout-ms`). FidelityMiddleware is built
with its features switched on one at a time on top of a bare route, and switched off one at
a time from the full stack, so each feature's cost is read twice: added to the frame alone,
and taken out of everything else. A variant is named by its features, joined with `+`:

  frame       FidelityMiddleware with every feature off: the decision context, its
              ContextVar, the header scan and the send wrapper
  deadline    the caller's deadline (`x-request-timeout-ms`) read and armed
  breaker     the route breaker: a gate before the app, the outcome recorded after
  limit       one permissive per-client rate limit (GCRA), with the RateLimit /
              RateLimit-Policy fields on every response (`rate_limit_headers = "always"`,
              the default); `limit+on_reject`: fields only on a 429; `limit+never`: none
  telemetry   the default observer (FidelityMiddleware's default; no OpenTelemetry SDK set
              up in the process), where the others run with `telemetry=False`

`deadline+breaker+limit` is the full stack: what benchmarks/overhead.py calls `fidelity`.
Also timed: `bare`, `noop` (a pure-ASGI middleware that does nothing) and `handwritten`
(overhead.py's hand-written key + bucket + breaker, the floor).

Timing: one worker process per build (`.venv` runs the sources; `.venv-compiled`, the mypyc
wheel `scripts/compiled.sh` installs, the compiled build), both warmed up and kept alive; each
round asks the builds, in a shuffled order and one at a time, to time every variant in a
shuffled order (process CPU time; `--wall` for wall time). Per build, a variant's cost is the
per-round paired difference to that worker's own bare route, and its ratio the per-round
ratio; we report medians and the interquartile range of the per-round ratios.

`--instructions` counts instead (valgrind's callgrind, user space; hash randomisation fixed):
one run per build builds and warms every app, then serves `--requests` requests of each
variant twice (in order, then reversed), each between two calls of `os.getppid` at which
callgrind dumps its counts (`--dump-before=os_getppid*`), so every served stretch is a part
of its own. Both passes are reported as one figure (their mean) when they agree within 1 %.
No other load moves these counts: they are the figures to trust on a busy machine.

    bash scripts/compiled.sh -q tests/test_compiled.py      # build + install the wheel
    .venv/bin/python benchmarks/features.py [--rounds 30] [--batch 1000] [--builds pure,compiled]
    .venv/bin/python benchmarks/features.py --instructions [--requests 1000]

Prints only (the figures go into docs/performance.md by hand, with date and machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._worker import Worker, serve_rounds  # noqa: E402

FEATURES: Final = ("deadline", "breaker", "limit", "telemetry")
FIELDS: Final = ("always", "on_reject", "never")
FULL: Final = "deadline+breaker+limit"

# (variant, the variant it is compared with, what the step is): features added to the frame
ADDED: Final = (
    ("frame", "bare", "the frame alone (every feature off)"),
    ("deadline", "frame", "+ deadline"),
    ("breaker", "frame", "+ route breaker"),
    ("limit+never", "frame", "+ per-client limit, no RateLimit fields"),
    ("limit+on_reject", "frame", "+ per-client limit, fields on 429s only"),
    ("limit", "frame", "+ per-client limit, fields on every response (default)"),
    ("telemetry", "frame", "+ telemetry, the default observer (no SDK)"),
)
# ... and taken out of the full stack (the step is what the full stack pays for it)
REMOVED: Final = (
    (FULL, "bare", "the full stack (deadline, breaker, limit, fields always)"),
    ("breaker+limit", FULL, "- deadline"),
    ("deadline+limit", FULL, "- route breaker"),
    ("deadline+breaker", FULL, "- per-client limit (and its fields)"),
    ("deadline+breaker+limit+on_reject", FULL, "fields on 429s only"),
    ("deadline+breaker+limit+never", FULL, "no fields"),
    ("deadline+breaker+limit+telemetry", FULL, "+ telemetry, the default observer (no SDK)"),
)
REFERENCES: Final = ("bare", "noop", "handwritten")
REFERENCE_STEPS: Final = {
    "noop": "a pure-ASGI middleware that does nothing",
    "handwritten": "hand-written key + bucket + breaker (the floor)",
}
DEFAULT_VARIANTS: Final = (
    *REFERENCES,
    *(name for name, _, _ in ADDED),
    *(name for name, _, _ in REMOVED),
)
GOAL: Final = 1.3  # a request's CPU time over a bare route's, in process


def parse(name: str) -> tuple[frozenset[str], str]:
    """A variant's features and its `rate_limit_headers` mode ("frame": none, "always")."""
    tokens = [] if name == "frame" else name.split("+")
    unknown = set(tokens) - set(FEATURES) - set(FIELDS)
    if unknown or len(tokens) != len(set(tokens)):
        raise ValueError(f"not a feature variant: {name!r} (features: {FEATURES}, {FIELDS})")
    modes = [t for t in tokens if t in FIELDS]
    if len(modes) > 1 or (modes and "limit" not in tokens):
        raise ValueError(f"{name!r}: one fields mode, and only with `limit`")
    return frozenset(t for t in tokens if t in FEATURES), (modes[0] if modes else "always")


def build_app(name: str) -> Any:
    """The Starlette app of a variant (a reference or a feature variant)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from benchmarks._asgi import hello
    from benchmarks.overhead import HandwrittenMiddleware, NoopMiddleware
    from fidelity_mw import DeadlineConfig, FidelityMiddleware, Policy, RateLimit

    routes = [Route("/hello", hello)]
    if name == "bare":
        return Starlette(routes=routes)
    if name in ("noop", "handwritten"):
        cls = NoopMiddleware if name == "noop" else HandwrittenMiddleware
        return Starlette(routes=routes, middleware=[Middleware(cls)])
    features, mode = parse(name)
    options: dict[str, Any] = {"rate_limit_headers": mode}
    if "deadline" not in features:  # no default, and a header no request sends
        options["deadline"] = DeadlineConfig(default_ms=None, header=("x-not-sent",))
    if "breaker" not in features:
        options["breaker"] = None
    if "limit" in features:  # overhead.py's permissive per-client limit
        options["rate_limits"] = (RateLimit(name="per-client", rate="1000000000/s"),)
    middleware = {"policy": Policy(**options)}
    if "telemetry" not in features:
        middleware["telemetry"] = False
    return Starlette(routes=routes, middleware=[Middleware(FidelityMiddleware, **middleware)])


def apps(names: Iterable[str]) -> dict[str, Any]:
    return {name: build_app(name) for name in names}


# --- timing -------------------------------------------------------------------------------


def worker(names: list[str], batch: int, seed: int, wall: bool) -> None:
    """Serve rounds over stdin/stdout: one JSON line of seconds per request per variant."""
    serve_rounds(apps(names), batch, seed, time.perf_counter if wall else time.process_time)


def start_worker(python: str, names: list[str], args: argparse.Namespace) -> Worker:
    cmd = [python, __file__, "--worker", "--variants", ",".join(names)]
    cmd += ["--batch", str(args.batch), "--seed", str(args.seed)]
    if args.wall:
        cmd.append("--wall")
    env = {**os.environ}
    env.pop("PYTHONPATH", None)  # the build's own fidelity_mw, not a src/ on the path
    return Worker(cmd, env)


def pythons(builds: Sequence[str], args: argparse.Namespace) -> dict[str, str]:
    found = {"pure": args.pure, "compiled": args.compiled}
    for build in builds:
        if build not in found:
            raise SystemExit(f"--builds: pure, compiled or pure,compiled, not {build!r}")
        if not Path(found[build]).exists():
            raise SystemExit(f"{found[build]} is missing (compiled: bash scripts/compiled.sh)")
    return {build: found[build] for build in builds}


def time_builds(
    builds: dict[str, str], names: list[str], args: argparse.Namespace
) -> dict[str, list[dict[str, float]]]:
    workers = {build: start_worker(python, names, args) for build, python in builds.items()}
    for build, w in workers.items():
        if w.hello["compiled"] != (build == "compiled"):
            raise SystemExit(f"{build}: {w.hello} is not the {build} build")
    samples: dict[str, list[dict[str, float]]] = {build: [] for build in workers}
    order = list(workers)
    shuffle = random.Random(args.seed + 1).shuffle
    for r in range(args.rounds):
        shuffle(order)
        for build in order:
            samples[build].append(workers[build].round())
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for w in workers.values():
        w.close()
    return samples


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def steps(names: Sequence[str]) -> list[tuple[str, str, str]]:
    """The rows of the tables: the variants timed, each with what it is compared with."""
    known = {name: (base, what) for name, base, what in (*ADDED, *REMOVED)}
    rows = []
    for name in names:
        if name == "bare":
            continue
        base, what = known.get(name, ("bare", ""))
        if base not in names:
            base = "bare"
        if name in REFERENCES:
            what = REFERENCE_STEPS[name]
        rows.append((name, base, what))
    return rows


def report_times(
    samples: dict[str, list[dict[str, float]]], names: Sequence[str], clock: str
) -> str:
    med = statistics.median
    builds = list(samples)
    head = "| variant | step |" + "".join(
        f" {b}: µs over bare | {b}: ratio to bare (IQR) | {b}: the step, µs |" for b in builds
    )
    lines = [head, "|---|---|" + "---:|" * (3 * len(builds))]
    bare_cells = "".join(
        f" {med(r['bare'] for r in samples[b]) * 1e6:.2f} µs | 1 | |" for b in builds
    )
    lines.append(f"| bare | the route alone |{bare_cells}")
    for name, base, what in steps(names):
        cells = ""
        for b in builds:
            rounds = samples[b]
            over = [r[name] - r["bare"] for r in rounds]
            q1, q2, q3 = quartiles([r[name] / r["bare"] for r in rounds])
            step = [r[name] - r[base] for r in rounds]
            mark = " ✓" if q2 <= GOAL else ""
            step_cell = "" if base == "bare" else f"{med(step) * 1e6:+.2f}"
            cells += f" {med(over) * 1e6:+.2f} | {q2:.3f}{mark} ({q1:.3f}-{q3:.3f}) | {step_cell} |"
        lines.append(f"| {name} | {what} |{cells}")
    rounds = len(next(iter(samples.values())))
    lines += [
        "",
        f"{rounds} rounds; per round each build's worker timed every variant ({clock}), in a "
        "shuffled order, the builds one after the other in a shuffled order. Medians of "
        "per-round paired differences and ratios to the same worker's bare route; IQR: the "
        "per-round ratios' interquartile range; the step: the median per-round difference "
        "to the variant it adds to (or is taken from). ✓: median ratio within "
        f"{GOAL}x bare.",
    ]
    return "\n".join(lines)


# --- instructions -------------------------------------------------------------------------

MARKER: Final = "os_getppid*"  # callgrind dumps its counts before each call of os.getppid


def segments(names: list[str], requests: int) -> None:
    """The run callgrind counts: every app built and warmed up, then `requests` requests of
    each variant, in order and then reversed, each stretch between two `os.getppid()` calls."""
    from benchmarks._asgi import make_scope, receive

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"unexpected status {message['status']}")

    async def go() -> None:
        built = apps(names)
        for app in built.values():
            for _ in range(500):
                await app(make_scope(), receive, send)
        for name in [*names, *reversed(names)]:
            app = built[name]
            scopes: list[Any] = [make_scope() for _ in range(requests)]
            os.getppid()
            for i in range(requests):
                scope, scopes[i] = scopes[i], None
                await app(scope, receive, send)
                del scope
            os.getppid()

    asyncio.run(go())


def parts(directory: Path, stem: str) -> list[int]:
    """The instructions of each dumped part of a callgrind run, in order."""
    from benchmarks.server_inprocess import callgrind_total

    found = sorted(
        (int(p.name.rsplit(".", 1)[1]), p)
        for p in directory.iterdir()
        if p.name.startswith(stem + ".") and p.name.rsplit(".", 1)[1].isdigit()
    )
    return [callgrind_total(p.read_text()) for _, p in found]


def served(totals: list[int], names: list[str], requests: int) -> dict[str, tuple[float, float]]:
    """Instructions per request of each variant in its two passes, from the parts' totals:
    part 1 is everything up to the first stretch; then a stretch and the setup before the
    next one alternate."""
    order = [*names, *reversed(names)]
    if len(totals) < 2 * len(order):
        raise ValueError(f"{len(totals)} parts for {len(order)} stretches")
    stretches = totals[1 : 2 * len(order) : 2]
    found: dict[str, list[float]] = {}
    for name, total in zip(order, stretches, strict=True):
        found.setdefault(name, []).append(total / requests)
    return {name: (a, b) for name, (a, b) in found.items()}


def count_build(python: str, names: list[str], requests: int) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="features-cg-") as tmp:
        out = Path(tmp) / "cg.out"
        argv = ["valgrind", "--tool=callgrind", f"--dump-before={MARKER}"]
        argv += [f"--callgrind-out-file={out}", python, __file__, "--segments"]
        argv += ["--variants", ",".join(names), "--requests", str(requests)]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        env.pop("PYTHONPATH", None)
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return served(parts(Path(tmp), out.name), names, requests)


def report_instructions(
    counts: dict[str, dict[str, tuple[float, float]]], names: Sequence[str], requests: int
) -> str:
    builds = list(counts)

    def one(build: str, name: str) -> float:
        a, b = counts[build][name]
        return (a + b) / 2

    head = "| variant | step |" + "".join(
        f" {b}: instructions over bare | {b}: ratio to bare | {b}: the step |" for b in builds
    )
    lines = [head, "|---|---|" + "---:|" * (3 * len(builds))]
    lines.append(
        "| bare | the route alone |" + "".join(f" {one(b, 'bare'):,.0f} | 1 | |" for b in builds)
    )
    unsteady = []
    for name, base, what in steps(names):
        cells = ""
        for b in builds:
            mine, bare, prev = one(b, name), one(b, "bare"), one(b, base)
            x, y = counts[b][name]
            if abs(x - y) > 0.01 * max(x, y):
                unsteady.append(f"{b} {name}: {x:,.0f} / {y:,.0f}")
            step = "" if base == "bare" else f"{mine - prev:+,.0f}"
            cells += f" {mine - bare:+,.0f} | {mine / bare:.3f} | {step} |"
        lines.append(f"| {name} | {what} |{cells}")
    lines += [
        "",
        f"callgrind, user space, {requests} requests of each variant after every app's "
        "500-request warm-up, counted twice (in order, then reversed; PYTHONHASHSEED=0), per "
        "request; the request's scope built outside the count. In-process ASGI calls.",
    ]
    if unsteady:
        lines.append("Passes more than 1 % apart: " + "; ".join(unsteady))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--builds", default="pure,compiled")
    parser.add_argument("--wall", action="store_true", help="time wall time, not CPU time")
    parser.add_argument("--pure", default=str(ROOT / ".venv/bin/python"))
    parser.add_argument("--compiled", default=str(ROOT / ".venv-compiled/bin/python"))
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions with callgrind"
    )
    parser.add_argument("--requests", type=int, default=1000, help="with --instructions")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--segments", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "bare" not in names:
        names.insert(0, "bare")
    for name in names:
        if name not in REFERENCES:
            parse(name)  # a bad name fails here, not in a worker
    if args.worker:
        worker(names, args.batch, args.seed, args.wall)
        return
    if args.segments:
        segments(names, args.requests)
        return
    builds = pythons([b.strip() for b in args.builds.split(",")], args)
    load = os.getloadavg()[0]
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind not found (Debian package valgrind)")
        run: Callable[[str], dict[str, tuple[float, float]]] = lambda python: count_build(  # noqa: E731
            python, names, args.requests
        )
        with ThreadPoolExecutor(max_workers=len(builds)) as pool:
            found = dict(zip(builds, pool.map(run, builds.values()), strict=True))
        print(report_instructions(found, names, args.requests))
    else:
        samples = time_builds(builds, names, args)
        print(report_times(samples, names, "wall time" if args.wall else "process CPU time"))
    print(f"\nload average (1 min): {load:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
