"""In-process ASGI cost per request: bare route vs middlewares, interleaved rounds.

Variants (each a Starlette app with one route, called directly as ASGI, no server):
  bare          the route alone
  noop          + a pure-ASGI middleware that does nothing
  handwritten   + a minimal hand-written key + token bucket + breaker middleware (the floor)
  fidelity      + FidelityMiddleware: permissive limit, breaker, deadline on; memory, tracing off
  slowapi       + slowapi's pure-ASGI middleware (memory storage, permissive default limit)
  pyresilience  + pyresilience's ResilientMiddleware (`pyresilience.contrib.fastapi`, pure
                ASGI) with its rate limiter (permissive; one bucket for all clients: it has
                no per-client key), a breaker and a timeout: the counterparts of
                fidelity's limit, route breaker and deadline
  fastapi       the same route on FastAPI, bare: throttled-py's integration runs on
                FastAPI only, so its variants are paired with this one as well as with
                `bare`
  fastapi+fidelity  + FidelityMiddleware on that FastAPI app
  throttled     throttled-py's FastAPI integration as documented: `@limiter.limit()` on
                the route (memory store, token bucket, permissive per-client limit keyed
                by `get_remote_address`), its RateLimitMiddleware for the `RateLimit-*`
                headers and its 429 exception handler
  throttled:no-headers  the same without RateLimitMiddleware (a BaseHTTPMiddleware): still
                limits and answers 429, but allowed responses carry no `RateLimit-*` fields

`--frameworks` adds each other middleware on that FastAPI app too (`fastapi+noop`,
`fastapi+handwritten`, `fastapi+slowapi`, `fastapi+pyresilience`) and reports what each costs
on FastAPI against what it costs on Starlette (paired per round, each against its own
framework's bare route): the control for FidelityMiddleware's higher cost on FastAPI.

Rounds run the variants in a shuffled order each time; we report the median
per-request time of each and the median of per-round paired differences and
ratios against `bare`, which cancels most drift on a shared machine.

    .venv/bin/python benchmarks/overhead.py [--rounds 30] [--batch 2000] [--no-write]
        [--breakdown] [--baseline REV] [--cpu-time] [--frameworks]

`--baseline REV` adds `fidelity@REV`: the same middleware from git revision REV
(extracted under another package name), so a change is measured against what it
replaced in the same interleaved rounds. `--cpu-time` times batches in this process's
CPU time (`time.process_time`) instead of wall time: on a shared, busy machine the
other processes' load then moves the figures much less.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib
import io
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request  # FastAPI resolves the route annotations here
from starlette.routing import Route

from benchmarks._asgi import hello, run_batch
from benchmarks._results import stamp, write_section
from fidelity_mw import DeadlineConfig, FidelityMiddleware, Policy, RateLimit

Scope = dict[str, Any]


class NoopMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class HandwrittenMiddleware:
    """What a careful user would write by hand: client key, token bucket, consecutive breaker."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.buckets: dict[str, tuple[float, float]] = {}
        self.failures = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = scope["client"][0]
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (1e9, now))
        tokens = min(1e9, tokens + (now - last) * 1e9)
        if tokens < 1 or self.failures > 5:
            await send({"type": "http.response.start", "status": 429, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        self.buckets[key] = (tokens - 1, now)
        status = 500

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_wrapper)
        self.failures = self.failures + 1 if status >= 500 else 0


def fidelity_policy() -> Policy:
    return Policy(rate_limits=[RateLimit(name="per-client", rate="1000000000/s")])


def breakdown_policies() -> dict[str, Policy]:
    """FidelityMiddleware with its layers switched on one at a time: where the time goes."""
    permissive = (RateLimit(name="per-client", rate="1000000000/s"),)
    no_deadline = DeadlineConfig(default_ms=None, header=("x-not-sent",))
    return {
        "fid:frame": Policy(breaker=None, deadline=no_deadline),
        "fid:+deadline": Policy(breaker=None),
        "fid:+breaker": Policy(),
        "fid:+limit": Policy(rate_limits=permissive, rate_limit_headers="on_reject"),
    }


def baseline_package(rev: str) -> Any:
    """fidelity_mw as of git revision `rev`, importable beside the working tree's."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "archive", rev, "src/fidelity_mw"], cwd=root, check=True, capture_output=True
    ).stdout
    target = Path(tempfile.mkdtemp(prefix="fidelity_baseline_"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    # one name per revision: under one name a second revision asked for in the same
    # process got the first one's modules from `sys.modules` (two tests compared against
    # different revisions, and the second compared against the first's code)
    name = "fidelity_mw_baseline_" + "".join(c if c.isalnum() else "_" for c in rev)
    (target / "src" / "fidelity_mw").rename(target / name)
    sys.path.insert(0, str(target))
    return importlib.import_module(name)


def slowapi_limiter() -> Any:
    from slowapi import Limiter
    from slowapi.util import get_remote_address

    return Limiter(key_func=get_remote_address, default_limits=["1000000000/second"])


def build_apps(
    breakdown: bool = False,
    baseline: str | None = None,
    toolkits: bool = False,
    frameworks: bool = False,
) -> dict[str, Any]:
    routes = [Route("/hello", hello)]
    apps: dict[str, Any] = {
        "bare": Starlette(routes=routes),
        "noop": Starlette(routes=routes, middleware=[Middleware(NoopMiddleware)]),
        "handwritten": Starlette(routes=routes, middleware=[Middleware(HandwrittenMiddleware)]),
        "fidelity": Starlette(
            routes=routes,
            middleware=[Middleware(FidelityMiddleware, policy=fidelity_policy(), telemetry=False)],
        ),
    }
    try:
        from slowapi.middleware import SlowAPIASGIMiddleware

        app = Starlette(routes=routes, middleware=[Middleware(SlowAPIASGIMiddleware)])
        app.state.limiter = slowapi_limiter()
        apps["slowapi"] = app
    except ImportError:  # pragma: no cover - slowapi is a dev dependency
        print("slowapi not installed: skipping that variant", file=sys.stderr)
    if toolkits or frameworks:
        apps.update(toolkit_apps())
    if frameworks:
        apps.update(framework_controls())
    if baseline is not None:
        old = baseline_package(baseline)  # its own Policy classes, for its isinstance checks
        policy = old.Policy(rate_limits=[old.RateLimit(name="per-client", rate="1000000000/s")])
        apps[f"fidelity@{baseline}"] = Starlette(
            routes=routes,
            middleware=[Middleware(old.FidelityMiddleware, policy=policy, telemetry=False)],
        )
    if breakdown:
        for name, policy in breakdown_policies().items():
            apps[name] = Starlette(
                routes=routes,
                middleware=[Middleware(FidelityMiddleware, policy=policy, telemetry=False)],
            )
    return apps


def resilience_config() -> Any:
    """pyresilience's counterparts of fidelity's limit (permissive), breaker and deadline."""
    from pyresilience import (
        CircuitBreakerConfig,
        RateLimiterConfig,
        ResilienceConfig,
        TimeoutConfig,
    )

    return ResilienceConfig(
        rate_limiter=RateLimiterConfig(max_calls=1_000_000_000, period=1.0),
        circuit_breaker=CircuitBreakerConfig(
            sliding_window_size=20,
            minimum_calls=20,
            failure_rate_threshold=0.5,
            recovery_timeout=5.0,
        ),
        timeout=TimeoutConfig(seconds=30.0),
    )


def fastapi_app(
    throttled: bool = False,
    headers: bool = True,
    middleware: type | None = None,
    **options: Any,
) -> Any:
    """The `/hello` route on FastAPI, with throttled-py's integration or one middleware
    (`app.add_middleware(middleware, **options)`, as its users write it)."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI()
    if throttled:
        from throttled.asyncio.contrib.fastapi import (
            Limiter,
            RateLimitExceededError,
            RateLimitMiddleware,
            get_remote_address,
            rate_limit_exceeded_handler,
        )

        limiter = Limiter("1000000000/s", key_func=get_remote_address)

        @app.get("/hello", response_class=PlainTextResponse)
        @limiter.limit()
        async def limited(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        if headers:
            app.add_middleware(RateLimitMiddleware)
        app.add_exception_handler(RateLimitExceededError, rate_limit_exceeded_handler)
    else:

        @app.get("/hello", response_class=PlainTextResponse)
        async def plain(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

    if middleware is not None:
        app.add_middleware(middleware, **options)
    return app


def toolkit_apps() -> dict[str, Any]:
    """pyresilience's ASGI middleware, and throttled-py's FastAPI integration beside a bare
    FastAPI app and FidelityMiddleware on it (a FastAPI route costs more than Starlette's)."""
    from pyresilience.contrib.fastapi import ResilientMiddleware

    return {
        "pyresilience": Starlette(
            routes=[Route("/hello", hello)],
            middleware=[Middleware(ResilientMiddleware, config=resilience_config())],
        ),
        "fastapi": fastapi_app(),
        "fastapi+fidelity": fastapi_app(
            middleware=FidelityMiddleware, policy=fidelity_policy(), telemetry=False
        ),
        "throttled": fastapi_app(throttled=True),
        "throttled:no-headers": fastapi_app(throttled=True, headers=False),
    }


# (the Starlette variant, its FastAPI counterpart) for `--frameworks`
FRAMEWORK_PAIRS: Final = (
    ("noop", "fastapi+noop"),
    ("handwritten", "fastapi+handwritten"),
    ("fidelity", "fastapi+fidelity"),
    ("slowapi", "fastapi+slowapi"),
    ("pyresilience", "fastapi+pyresilience"),
)


def framework_controls() -> dict[str, Any]:
    """The other middlewares on the FastAPI app too: does any middleware cost more there?"""
    from pyresilience.contrib.fastapi import ResilientMiddleware
    from slowapi.middleware import SlowAPIASGIMiddleware

    slowapi = fastapi_app(middleware=SlowAPIASGIMiddleware)
    slowapi.state.limiter = slowapi_limiter()
    return {
        "fastapi+noop": fastapi_app(middleware=NoopMiddleware),
        "fastapi+handwritten": fastapi_app(middleware=HandwrittenMiddleware),
        "fastapi+slowapi": slowapi,
        "fastapi+pyresilience": fastapi_app(
            middleware=ResilientMiddleware, config=resilience_config()
        ),
    }


async def measure(
    rounds: int,
    batch: int,
    seed: int,
    breakdown: bool = False,
    baseline: str | None = None,
    timer: Callable[[], float] = time.perf_counter,
    frameworks: bool = False,
) -> dict[str, list[float]]:
    apps = build_apps(breakdown, baseline, toolkits=True, frameworks=frameworks)
    for app in apps.values():  # warm up: build middleware stacks, fill caches
        await run_batch(app, 500)
    samples: dict[str, list[float]] = {name: [] for name in apps}
    order = list(apps)
    shuffle = random.Random(seed).shuffle
    for r in range(rounds):
        shuffle(order)
        for name in order:
            samples[name].append(await run_batch(apps[name], batch, timer))
        print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return samples


def report(
    samples: dict[str, list[float]], rounds: int, batch: int, clock: str = "wall time"
) -> str:
    bare = samples["bare"]
    lines = [
        "| variant | median µs/request | overhead vs bare (median of paired diffs) "
        "| ratio vs bare |",
        "|---|---:|---:|---:|",
    ]
    us: Callable[[float], str] = lambda s: f"{s * 1e6:.2f}"  # noqa: E731
    for name, values in samples.items():
        diffs = [v - b for v, b in zip(values, bare, strict=True)]
        ratios = [v / b for v, b in zip(values, bare, strict=True)]
        overhead = "—" if name == "bare" else f"{statistics.median(diffs) * 1e6:+.2f} µs"
        lines.append(
            f"| {name} | {us(statistics.median(values))} | {overhead} "
            f"| {statistics.median(ratios):.3f} |"
        )
    lines.append("")
    lines.append(
        f"{rounds} interleaved rounds x {batch} sequential requests per variant per round "
        f"({clock}); in-process ASGI calls (no server, no sockets), Starlette 1.x, one route "
        "returning PlainTextResponse. FidelityMiddleware: one permissive per-client limit, the "
        "default route breaker, deadline from `x-request-timeout-ms`, memory state, telemetry "
        "off. Goal: ≤ 1.3 x bare and ≤ 2.5 x the hand-written floor's overhead."
    )
    if "handwritten" in samples:
        # the overhead over the floor's, per round (paired), then the median
        floor = [h - b for h, b in zip(samples["handwritten"], bare, strict=True)]
        for name in samples:
            if name.startswith("fidelity"):
                times = [
                    (v - b) / f if f > 0 else float("inf")
                    for v, b, f in zip(samples[name], bare, floor, strict=True)
                ]
                lines.append(
                    f"\n{name}: overhead {statistics.median(times):.1f} x the hand-written "
                    "floor's (median of per-round ratios)."
                )
    for name in samples:
        if name.startswith("fidelity@") and "fidelity" in samples:
            # the change itself, paired per round: less drift than two overheads apart
            diffs = [v - b for v, b in zip(samples["fidelity"], samples[name], strict=True)]
            ratios = [v / b for v, b in zip(samples["fidelity"], samples[name], strict=True)]
            lines.append(
                f"\nfidelity vs {name}: {statistics.median(diffs) * 1e6:+.2f} µs per request, "
                f"{statistics.median(ratios):.3f} x (medians of per-round paired differences "
                "and ratios)."
            )
    if "fastapi" in samples:
        base = samples["fastapi"]
        lines += [
            "",
            "On FastAPI (throttled-py's integration needs it), against the bare FastAPI route "
            f"({us(statistics.median(base))} µs), medians of per-round paired differences and "
            "ratios:",
            "",
        ]
        for name in ("fastapi+fidelity", "throttled", "throttled:no-headers"):
            if name not in samples:
                continue
            diffs = [v - b for v, b in zip(samples[name], base, strict=True)]
            ratios = [v / b for v, b in zip(samples[name], base, strict=True)]
            lines.append(
                f"- {name}: {statistics.median(diffs) * 1e6:+.2f} µs, "
                f"{statistics.median(ratios):.3f} x"
            )
    pairs = [(s, f) for s, f in FRAMEWORK_PAIRS if s in samples and f in samples]
    if "fastapi" in samples and len(pairs) > 1:
        base = samples["fastapi"]
        lines += [
            "",
            "Each middleware on Starlette and on FastAPI (`--frameworks`): its overhead over "
            "its own framework's bare route, and FastAPI's over Starlette's (medians of "
            "per-round paired differences and ratios):",
            "",
            "| middleware | on Starlette | on FastAPI | FastAPI / Starlette |",
            "|---|---:|---:|---:|",
        ]
        for on_starlette, on_fastapi in pairs:
            star = [v - b for v, b in zip(samples[on_starlette], bare, strict=True)]
            fast = [v - b for v, b in zip(samples[on_fastapi], base, strict=True)]
            ratio = [f / s if s > 0 else float("inf") for s, f in zip(star, fast, strict=True)]
            lines.append(
                f"| {on_starlette} | {statistics.median(star) * 1e6:+.2f} µs "
                f"| {statistics.median(fast) * 1e6:+.2f} µs | {statistics.median(ratio):.2f} |"
            )
    steps = [
        ("fid:frame", "bare", "the frame: context + ContextVar, one header scan, send wrapper"),
        ("fid:+deadline", "fid:frame", "deadline: parse `x-request-timeout-ms`, set the deadline"),
        (
            "fid:+breaker",
            "fid:+deadline",
            "route breaker: gate before, outcome after (one lock each)",
        ),
        ("fid:+limit", "fid:+breaker", "rate limit: key, GCRA in the same store call"),
        ("fidelity", "fid:+limit", "RateLimit / RateLimit-Policy fields on the response"),
    ]
    if all(name in samples for name, _, _ in steps):
        lines += [
            "",
            "Where the time goes (`--breakdown`: layers switched on one at a time, "
            "median of paired per-round differences):",
            "",
        ]
        for name, before, what in steps:
            diffs = [v - b for v, b in zip(samples[name], samples[before], strict=True)]
            lines.append(f"- {statistics.median(diffs) * 1e6:+.2f} µs  {what}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="add FidelityMiddleware with its layers switched on one at a time",
    )
    parser.add_argument(
        "--baseline", metavar="REV", help="add FidelityMiddleware as of git revision REV"
    )
    parser.add_argument(
        "--cpu-time", action="store_true", help="time in process CPU time, not wall time"
    )
    parser.add_argument(
        "--frameworks",
        action="store_true",
        help="add each middleware on FastAPI too: its cost there against on Starlette",
    )
    args = parser.parse_args()
    timer = time.process_time if args.cpu_time else time.perf_counter
    samples = asyncio.run(
        measure(
            args.rounds,
            args.batch,
            args.seed,
            args.breakdown,
            args.baseline,
            timer,
            args.frameworks,
        )
    )
    clock = "process CPU time" if args.cpu_time else "wall time"
    table = report(samples, args.rounds, args.batch, clock)
    print(table)
    if not args.no_write:
        write_section("Inbound overhead (benchmarks/overhead.py)", f"{stamp()}\n\n{table}")


if __name__ == "__main__":
    main()
