"""What fidelity_mw's tracing adds to an OpenTelemetry-instrumented request, and what the
observer costs when no SDK is configured. In-process ASGI calls, interleaved rounds.

Instrumented variants share one SDK TracerProvider (SimpleSpanProcessor into an
exporter that only counts spans) and one SDK MeterProvider (in-memory reader):

  instr              OpenTelemetryMiddleware(Starlette route)   - the baseline
  instr+fidelity     + FidelityMiddleware, telemetry on (Telemetry with the same providers)
  instr+fidelity-off + FidelityMiddleware, telemetry off        - the middleware alone

No SDK (the API's proxy providers, nothing set globally):

  fidelity-off       Starlette route + FidelityMiddleware(telemetry=False)
  fidelity-nosdk     Starlette route + FidelityMiddleware with the default observer

Targets: instr+fidelity <= 1.10 x instr and instr+fidelity-off <= 1.04 x instr
(medians of paired per-round ratios), and no extra span per inbound request
(spans per request equal in both). The no-SDK cost is fidelity-nosdk - fidelity-off.

`--baseline REV` adds `instr+fidelity@REV` and `instr+fidelity-off@REV`: the same
stacks with fidelity_mw as of git revision REV (extracted under another package
name), so a change is measured against what it replaced in the same rounds.
`--ablation` adds the telemetry switched on piece by piece (`instr+fid:start`:
only the observer's `start`; `:+summary`: and the decisions' summary at the
response end; `:+span`: and the span annotated, metrics off; then
`instr+fidelity`: and the metrics), so each piece's cost is a paired
difference within one run; and `instr+fid:sdk-floor`, the floor of this schema through
the public API: an observer that does nothing but find the current span and set on it,
in one `set_attributes`, the `fidelity.*` attributes ours set (copied from an
annotated span of the run). `--gc` also reports garbage collections per request
and the objects left in reference cycles (gc.DEBUG_SAVEALL), per variant, from
untimed passes. `--working-set` adds the middleware (tracing off) on a bare route
and inside `SdkWork` (the instrumentation's SDK work done beside the request, never
made current): it answers why the middleware costs more inside an instrumented
request than outside one. `--count` adds the bytecode instructions each variant executes
per request (`sys.settrace` opcode events): a count, so the machine's load does
not move it, and the paired times follow it.

`--by-function` splits the telemetry's bytecodes (`instr+fidelity` - `instr+fidelity-off`)
by the function that ran them, with the Python calls each made: what the telemetry is,
call by call. `--by-function A,B` splits `A` - `B` instead (any two variants of
`--ablation` or `--working-set`: `instr+fidelity-off,instr` is the middleware inside the
instrumentation, `instr+fidelity,instr+fid:sdk-floor` what ours adds to the SDK's floor).
`--instructions` counts machine instructions per request instead of timing
(`valgrind --tool=callgrind`, user space, each variant run with and without `--requests`
more requests after the same warm-up, the difference per request): a count the machine's
load does not move, which includes what bytecodes do not show (C calls, the allocator,
the garbage collector). `--instructions --inside` splits the middleware's instructions
(tracing off) inside the instrumented request (`instr+fidelity-off` - `instr`) against
on a bare route (`fidelity-off` - `bare`) by function, each function's own: what it does
more in there, if anything; `--instructions --cache` adds callgrind's simulated cache
misses per request (first level and last level, reads and writes) and its branch
predictor's (conditional `Bcm`, indirect `Bim`) to the counts; `--last-level BYTES`
simulates the last level that size instead (callgrind models two levels: with the real
L2's size its last-level misses are what the L2 would miss, the TLB still not modelled).

`--own-time` times the middleware alone (tracing off) by clocks around it: its time less
the route's below it and the sends' above it, per request, on a bare route, inside the
instrumented request, inside `SdkWork`, and on a bare route after each request read 256
KiB, 1 MiB and 4 MiB of other data, or one cache line on each of 6,144 pages. The same
code and instructions in every row: where the times differ, it is the processor state
the middleware finds, not its work, that the counts above cannot see.

`--hooks` times the observer alone instead: its `start`, `before_response_end`
and `end` on one captured allowed request, around a real SDK server span started
and ended as the ASGI instrumentation does, against the same loop without the
hooks (minimum over interleaved repeats: the hooks are a few microseconds, and
a full request's noise on a shared machine is larger than that). With
`--baseline REV` the old observer is timed in the same repeats. To compare two
builds that cannot share a process (pure and compiled), run each in turn. A row
`SDK set_attributes alone` sets the attributes the observer set, in one
`set_attributes` and nothing else: the SDK's share of the hooks' cost.

Each request's scope is dropped once it is answered, as a server drops it (the
middleware keeps its DecisionContext in `scope["state"]`). `--keep-scopes` keeps
every scope of a batch alive until the batch ends, as benchmarks/_asgi.py does:
per-request objects then survive into older GC generations and are traversed
there, a cost no server pays.

    .venv/bin/python benchmarks/telemetry_overhead.py [--rounds 30] [--batch 1000]
        [--baseline REV] [--ablation] [--working-set] [--gc] [--count] [--keep-scopes]
        [--by-function [A,B]] [--instructions [--requests N] [--variants A,B,...] [--inside]
        [--cache] [--last-level BYTES]] [--hooks] [--own-time]
        [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import importlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.routing import Route, Router

import fidelity_mw
from benchmarks import _asgi
from benchmarks._asgi import hello
from benchmarks._results import stamp, write_section
from benchmarks.overhead import baseline_package, fidelity_policy
from fidelity_mw import FidelityMiddleware
from fidelity_mw.telemetry import Telemetry
from fidelity_mw.telemetry.observer import global_tracer_provider
from fidelity_mw.telemetry.summary import summary_of

TARGET_RATIO = 1.10
TARGET_OFF_RATIO = 1.04
ABLATION = (
    ("instr+fid:start", "instr+fidelity-off", "`start`: find the server span"),
    ("instr+fid:+summary", "instr+fid:start", "the decisions' summary, at the response end"),
    ("instr+fid:+span", "instr+fid:+summary", "the span annotated (one `set_attributes`)"),
    ("instr+fidelity", "instr+fid:+span", "the metrics (tallies, under one lock)"),
    (
        "instr+fid:sdk-floor",
        "instr+fidelity-off",
        "the SDK's floor: the same attributes, one `get_current_span` and one "
        "`set_attributes`, nothing of ours",
    ),
    ("instr+fidelity", "instr+fid:sdk-floor", "ours above that floor"),
)


class CountingExporter(SpanExporter):
    """Drops spans, counting them (and noting who made them)."""

    def __init__(self) -> None:
        self.count = 0
        self.fidelity_spans = 0
        # while set: the `fidelity.*` attributes of the last span that had them
        # (`floor_attributes`; off otherwise, not to add to any variant's cost)
        self.capture = False
        self.fidelity_attributes: dict[str, Any] = {}

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        for span in spans:
            scope = span.instrumentation_scope
            if scope is not None and scope.name == "fidelity_mw":
                self.fidelity_spans += 1
            attributes = span.attributes or {}
            if self.capture and "fidelity.decisions" in attributes:
                self.fidelity_attributes = {
                    k: v for k, v in attributes.items() if k.startswith("fidelity.")
                }
        return SpanExportResult.SUCCESS


async def run_batch(app: Any, n: int, keep_scopes: bool = False) -> float:
    """CPU seconds per request over n sequential requests (every one must be a 200);
    other processes' load counts less in process time."""
    return await _asgi.run_batch(app, n, time.process_time, keep_scopes)


class StartOnly:
    """Ablation: the observer's `start` (it finds the server span), nothing after it."""

    def __init__(self, inner: Telemetry) -> None:
        self.inner = inner

    def start(self, ctx: Any, scope: Any) -> Any:
        return self.inner.start(ctx, scope)

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        return None


class StartAndSummary(StartOnly):
    """Ablation: `start`, then the decisions' summary at the response end (from the
    admission's facts when that shape was seen, else from the records built)."""

    def before_response_end(self, ctx: Any, scope: Any, token: Any) -> None:
        summary_of(ctx)


class SdkWork:
    """The instrumentation's SDK work, unrelated to the request: spans (never made
    current, on a provider of their own) and a histogram record, before the app, at
    each message sent and after. The middleware inside it runs no other code than
    alone, but within a request with as large a working set as an instrumented one."""

    def __init__(self, app: Any) -> None:
        self.app = app
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(CountingExporter()))
        self.tracer = provider.get_tracer("sdk-work")
        meter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("sdk-work")
        self.histogram = meter.create_histogram("sdk-work")

    def work(self) -> None:
        span = self.tracer.start_span("GET /hello", attributes={"url.path": "/hello", "n": 1})
        span.set_attribute("asgi.event.type", "http.response.start")
        span.end()
        self.histogram.record(0.001, {"http.request.method": "GET", "status": 200})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.work()
        self.work()

        async def sending(message: Any) -> None:
            self.work()
            await send(message)

        await self.app(scope, receive, sending)
        self.work()


class SetAttributesOnly:
    """An observer that only sets given attributes on the current span at the response end."""

    def __init__(self, attributes: dict[str, Any]) -> None:
        self.attributes = attributes

    def start(self, ctx: Any, scope: Any) -> Any:
        return None

    def before_response_end(self, ctx: Any, scope: Any, token: Any) -> None:
        span = trace_api.get_current_span()
        if len(self.attributes) > 2:
            span.set_attributes(self.attributes)
        else:  # as the observer does: for one or two, cheaper than the mapping's checks
            for name, value in self.attributes.items():
                span.set_attribute(name, value)

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        return None


SDK_FLOOR_OBSERVER = SetAttributesOnly({})


def build(
    tp: TracerProvider,
    mp: MeterProvider,
    baseline: str | None = None,
    ablation: bool = False,
    working_set: bool = False,
) -> dict[str, Any]:
    routes = [Route("/hello", hello)]

    def starlette(middleware: Any = None, policy: Any = None, **fidelity: Any) -> Any:
        app = Starlette(routes=routes)
        if fidelity:
            app.add_middleware(
                middleware or FidelityMiddleware, policy=policy or fidelity_policy(), **fidelity
            )
        return app

    def instrumented(app: Any) -> Any:
        return OpenTelemetryMiddleware(app, tracer_provider=tp, meter_provider=mp)

    telemetry = Telemetry(tracer_provider=tp, meter_provider=mp)
    apps = {
        "instr": instrumented(starlette()),
        "instr+fidelity": instrumented(starlette(observer=telemetry)),
        "instr+fidelity-off": instrumented(starlette(telemetry=False)),
        "fidelity-off": starlette(telemetry=False),
        "fidelity-nosdk": starlette(telemetry=True),
    }
    if baseline is not None:
        old = baseline_package(baseline)  # its own classes, for its isinstance checks
        policy = old.Policy(rate_limits=[old.RateLimit(name="per-client", rate="1000000000/s")])
        old_telemetry = importlib.import_module(f"{old.__name__}.telemetry").Telemetry(
            tracer_provider=tp, meter_provider=mp
        )
        apps[f"instr+fidelity@{baseline}"] = instrumented(
            starlette(old.FidelityMiddleware, policy, observer=old_telemetry)
        )
        apps[f"instr+fidelity-off@{baseline}"] = instrumented(
            starlette(old.FidelityMiddleware, policy, telemetry=False)
        )
    if ablation:
        no_metrics = Telemetry(tracer_provider=tp, meter_provider=NoOpMeterProvider())
        apps["instr+fid:start"] = instrumented(starlette(observer=StartOnly(telemetry)))
        apps["instr+fid:+summary"] = instrumented(starlette(observer=StartAndSummary(telemetry)))
        apps["instr+fid:+span"] = instrumented(starlette(observer=no_metrics))
        # its attributes: `floor_attributes` once an annotated span was exported
        apps["instr+fid:sdk-floor"] = instrumented(starlette(observer=SDK_FLOOR_OBSERVER))
    if working_set:
        apps["bare"] = starlette()
        apps["sdk-work"] = SdkWork(starlette())
        apps["sdk-work+fidelity-off"] = SdkWork(starlette(telemetry=False))
    return apps


async def floor_attributes(apps: dict[str, Any], exporter: CountingExporter) -> None:
    """Give `instr+fid:sdk-floor`'s observer the attributes ours set on a request."""
    if "instr+fid:sdk-floor" not in apps:
        return
    exporter.capture = True
    await run_batch(apps["instr+fidelity"], 1)
    exporter.capture = False
    if not exporter.fidelity_attributes:
        raise SystemExit("no span with fidelity.* attributes was exported")
    SDK_FLOOR_OBSERVER.attributes.update(exporter.fidelity_attributes)


async def spans_per_request(app: Any, exporter: CountingExporter, n: int) -> tuple[float, float]:
    before, before_ours = exporter.count, exporter.fidelity_spans
    await run_batch(app, n)
    return (exporter.count - before) / n, (exporter.fidelity_spans - before_ours) / n


async def gc_profile(app: Any, n: int, keep_scopes: bool) -> tuple[list[float], float]:
    """(collections per request of each generation, objects per request left in cycles)."""
    counts: collections.Counter[int] = collections.Counter()

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            counts[info["generation"]] += 1

    gc.collect()
    gc.callbacks.append(count)
    try:
        await run_batch(app, n, keep_scopes)
    finally:
        gc.callbacks.remove(count)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # the collector keeps what it would free: cyclic garbage
    try:
        await run_batch(app, n // 10, keep_scopes)
        gc.collect()
        cyclic = len(gc.garbage) / (n // 10)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return [counts[g] / n for g in range(3)], cyclic


async def bytecodes_per_request(app: Any, n: int) -> float:
    """Bytecode instructions executed per request (opcode events of every frame)."""
    executed = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal executed
        if event == "opcode":
            executed += 1
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    sys.settrace(trace)
    try:
        await run_batch(app, n)
    finally:
        sys.settrace(None)
    return executed / n


def _where(code: Any) -> str:
    """A function as `package/module.py:qualname`, site-packages and src/ left off."""
    path = code.co_filename.split("site-packages/")[-1].split("/src/")[-1]
    return f"{path}:{code.co_qualname}"


async def bytecodes_by_function(app: Any, n: int) -> tuple[collections.Counter[str], ...]:
    """(bytecodes, calls) per function over n requests."""
    executed: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            executed[_where(frame.f_code)] += 1
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        calls[_where(frame.f_code)] += 1
        return local

    sys.settrace(trace)
    try:
        await run_batch(app, n)
    finally:
        sys.settrace(None)
    return executed, calls


async def by_function(pair: str = "instr+fidelity,instr+fidelity-off", n: int = 200) -> str:
    """`A` - `B` of `pair` ("A,B"; by default the telemetry itself), function by function."""
    exporter = CountingExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
    apps = build(tp, mp, ablation=True, working_set=True)
    name_on, _, name_off = pair.partition(",")
    on, off = apps[name_on], apps[name_off]
    await floor_attributes(apps, exporter)
    for app in (on, off):
        await run_batch(app, 300)
    (ran, called), (ran_off, called_off) = [await bytecodes_by_function(a, n) for a in (on, off)]
    rows = []
    for where in set(ran) | set(ran_off) | set(called) | set(called_off):
        more = (ran[where] - ran_off[where]) / n
        calls = (called[where] - called_off[where]) / n
        if abs(more) >= 0.5 or abs(calls) >= 0.05:
            rows.append((more, calls, where))
    rows.sort(key=lambda row: (-row[0], row[2]))
    total = (sum(ran.values()) - sum(ran_off.values())) / n
    sdk = sum(more for more, _, where in rows if where.startswith(("opentelemetry/", "<frozen")))
    lines = [
        "| bytecodes/request | Python calls/request | function |",
        "|---:|---:|---|",
        *(f"| {more:+.0f} | {calls:+.2f} | `{where}` |" for more, calls, where in rows),
        "",
        f"`{name_on}` - `{name_off}`: {total:+.0f} bytecodes per request, of which OpenTelemetry's "
        f"(API and SDK) {sdk:+.0f}; {n} requests of each variant after a warm-up, "
        "`sys.settrace` opcode events by the function that ran them.",
    ]
    tp.shutdown()
    mp.shutdown()
    return "\n".join(lines)


INSTRUCTION_VARIANTS = (
    "instr",
    "instr+fidelity",
    "instr+fidelity-off",
    "instr+fid:sdk-floor",
    "fidelity-off",
    "bare",
)


def run_one(variant: str, n: int) -> None:
    """One variant, warmed up, then n requests (a callgrind run of `--instructions`)."""

    async def go() -> None:
        exporter = CountingExporter()
        tp = TracerProvider()
        tp.add_span_processor(SimpleSpanProcessor(exporter))
        mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
        apps = build(tp, mp, ablation=True, working_set=True)
        await floor_attributes(apps, exporter)
        app = apps[variant]
        await run_batch(app, 500)
        # A full collection walks every object of the process (the imports, the warm-up):
        # one more or one fewer in one of the two runs moved the difference by ~10k
        # instructions per request. Frozen, a collection walks only the requests' objects.
        gc.collect()
        gc.freeze()
        if n:
            await run_batch(app, n)

    asyncio.run(go())


def callgrind_texts(
    variant: str, requests: int, cache: bool = False, last_level: int | None = None
) -> tuple[str, str]:
    """The callgrind outputs of one variant: the warm-up alone, and with `requests` more
    (`cache`: with callgrind's cache simulation, its miss events too; `last_level`: its
    last-level cache of that many bytes, 8-way, instead of the machine's last level)."""
    script = str(Path(__file__).resolve())
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    # Once outside callgrind first: a module whose cached bytecode is missing or stale (an
    # edited source) is compiled in whichever counted run imports it first, and once
    # (~0.6M instructions of the parser in one run of the two, none in the other).
    subprocess.run(
        [sys.executable, script, "--one", variant, "--requests", "0"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    texts = []
    for n in (0, requests):
        with tempfile.TemporaryDirectory(prefix="telemetry-cg-") as tmp:
            out = Path(tmp) / "callgrind.out"
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            if cache:
                # and its branch predictor's: the interpreter's dispatch is an indirect
                # branch per bytecode, whose misses a larger working set could add
                argv += ["--cache-sim=yes", "--branch-sim=yes"]
            if last_level:
                # callgrind simulates two levels, L1 and the last; the L2 between them (1
                # MiB here, against a 32 MiB L3 shared with the host's other guests) is where
                # a request's working set stops fitting: simulated as the last level, its
                # misses are what the L3 (or memory) then has to serve
                argv += [f"--LL={last_level},8,64"]
            argv += [sys.executable, script, "--one", variant]
            subprocess.run(
                [*argv, "--requests", str(n)],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            texts.append(out.read_text())
    return texts[0], texts[1]


def callgrind_events(text: str) -> dict[str, int]:
    """A callgrind output's totals by event (Ir; with the cache simulation the misses)."""
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            return dict(zip(names, map(int, line.split()[1:]), strict=False))
    raise ValueError("no summary or totals line: not a callgrind output file")


def count_events(
    variant: str, requests: int, cache: bool = False, last_level: int | None = None
) -> dict[str, float]:
    """Each event per request: a callgrind run with `requests` more than one without."""
    texts = (
        callgrind_texts(variant, requests, True, last_level)
        if last_level
        else callgrind_texts(variant, requests, cache)
    )
    without, with_requests = (callgrind_events(t) for t in texts)
    return {k: (with_requests[k] - without.get(k, 0)) / requests for k in with_requests}


def count_instructions(variant: str, requests: int) -> float:
    """Instructions per request: a callgrind run with `requests` more than one without."""
    return count_events(variant, requests)["Ir"]


# (the middleware inside the instrumentation, its stack without it), (on a bare route, ...)
INSIDE = (("instr+fidelity-off", "instr"), ("fidelity-off", "bare"))


def inside_by_function(requests: int, top: int = 40) -> str:
    """The middleware's own instructions inside the instrumented request against on a bare
    route, function by function (each function's own, callgrind): what it does more (or
    less) in there. `--instructions --inside`."""
    from benchmarks.outbound import callgrind_self

    own: dict[str, dict[str, float]] = {}
    for variant in (v for pair in INSIDE for v in pair):
        without, with_requests = (callgrind_self(t) for t in callgrind_texts(variant, requests))
        own[variant] = {
            fn: (with_requests.get(fn, 0) - without.get(fn, 0)) / requests
            for fn in {*without, *with_requests}
        }
        print(f"{variant}: counted", file=sys.stderr, flush=True)
    (a, b), (c, d) = INSIDE

    def over(x: str, y: str) -> dict[str, float]:
        return {fn: own[x].get(fn, 0.0) - own[y].get(fn, 0.0) for fn in {*own[x], *own[y]}}

    inside, outside = over(a, b), over(c, d)
    rows = [
        (inside.get(fn, 0.0) - outside.get(fn, 0.0), inside.get(fn, 0.0), outside.get(fn, 0.0), fn)
        for fn in {*inside, *outside}
    ]
    rows.sort(key=lambda row: -abs(row[0]))
    lines = [
        "| inside - outside | inside (`instr+fidelity-off` - `instr`) | outside "
        "(`fidelity-off` - `bare`) | function (own instructions) |",
        "|---:|---:|---:|---|",
        *(
            f"| {d:+,.0f} | {i:+,.0f} | {o:+,.0f} | `{fn.split('/')[-1][:90]}` |"
            for d, i, o, fn in rows[:top]
        ),
        "",
        f"The middleware inside the instrumented request {sum(inside.values()):+,.0f} "
        f"instructions per request, on a bare route {sum(outside.values()):+,.0f}; callgrind, "
        f"each variant with and without {requests} requests after the same warm-up.",
    ]
    return "\n".join(lines)


def misses_report(events: dict[str, dict[str, float]]) -> str:
    """Cache misses per request by variant (`--cache`: callgrind's simulated caches, first
    level I1/D1 and last level LL, reads and writes; mispredicted conditional and indirect
    branches, Bcm and Bim), and the two middleware rows."""
    names = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bcm", "Bim")
    lines = ["", "| variant | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [
        f"| {v} | " + " | ".join(f"{e.get(n, 0.0):,.0f}" for n in names) + " |"
        for v, e in events.items()
    ]
    for name, base in (*INSIDE, ("sdk-work+fidelity-off", "sdk-work")):
        if name in events and base in events:
            more = " ".join(
                f"{n} {events[name].get(n, 0.0) - events[base].get(n, 0.0):+,.0f}" for n in names
            )
            lines.append(f"- `{name}` - `{base}`: {more}")
    return "\n".join(lines)


def instructions_report(counts: dict[str, float], requests: int) -> str:
    over = (
        ("instr+fidelity", "instr", "tracing on, in the instrumented request"),
        ("instr+fidelity", "instr+fidelity-off", "the telemetry itself"),
        ("instr+fidelity-off", "instr", "the middleware, tracing off, inside it"),
        ("instr+fid:sdk-floor", "instr+fidelity-off", "the SDK's floor for these attributes"),
        ("instr+fidelity", "instr+fid:sdk-floor", "ours above that floor"),
        ("fidelity-off", "bare", "the middleware, tracing off, on a bare route"),
    )
    lines = ["| variant | instructions/request |", "|---|---:|"]
    lines += [f"| {name} | {value:,.0f} |" for name, value in counts.items()]
    lines.append("")
    for name, base, what in over:
        if name not in counts or base not in counts:
            continue
        more = counts[name] - counts[base]
        lines.append(f"- {what}: {more:+,.0f} ({counts[name] / counts[base]:.3f}x {base})")
    lines += [
        "",
        f"callgrind, user space: each variant with and without {requests} requests after the "
        "same 500-request warm-up (PYTHONHASHSEED=0; the warm-up's objects then frozen, "
        "`gc.freeze()`), the difference per request.",
    ]
    return "\n".join(lines)


async def measure(
    rounds: int,
    batch: int,
    seed: int,
    baseline: str | None,
    ablation: bool,
    keep_scopes: bool,
    gc_report: bool,
    count: bool,
    working_set: bool = False,
) -> tuple[
    dict[str, list[float]],
    dict[str, tuple[float, float]],
    dict[str, tuple[list[float], float]],
    dict[str, float],
]:
    if global_tracer_provider() is not None:
        raise SystemExit("a global TracerProvider is set: the no-SDK variant would be wrong")
    exporter = CountingExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
    apps = build(tp, mp, baseline, ablation, working_set)
    for app in apps.values():  # warm up: middleware stacks, plans, instruments
        await run_batch(app, 300)
    await floor_attributes(apps, exporter)
    spans = {name: await spans_per_request(app, exporter, 200) for name, app in apps.items()}
    gcs = {}
    if gc_report:
        gcs = {name: await gc_profile(app, batch, keep_scopes) for name, app in apps.items()}
    counts = {}
    if count:
        counts = {name: await bytecodes_per_request(app, 200) for name, app in apps.items()}
    samples: dict[str, list[float]] = {name: [] for name in apps}
    order = list(apps)
    shuffle = random.Random(seed).shuffle
    for r in range(rounds):
        shuffle(order)
        for name in order:
            samples[name].append(await run_batch(apps[name], batch, keep_scopes))
        print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tp.shutdown()
    mp.shutdown()
    return samples, spans, gcs, counts


class OwnClock:
    """Clocks an ASGI app per request (`perf_counter_ns`), and apart the time spent in the
    `send` it was given: two of them around the middleware and the route below it leave
    the middleware's own time (`own_times`)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.total: list[int] = []
        self.sent: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        spent = 0
        clock = time.perf_counter_ns

        async def timed_send(message: Any) -> None:
            nonlocal spent
            began = clock()
            await send(message)
            spent += clock() - began

        began = clock()
        await self.app(scope, receive, timed_send)
        self.total.append(clock() - began)
        self.sent.append(spent)


def own_times(outer: OwnClock, inner: OwnClock) -> list[int]:
    """The middleware's own ns per request: its whole time less the route's (each without
    the sends it passed up; the route's sends run the middleware's send wrapper)."""
    return [
        total - sent - (route - route_sent)
        for total, sent, route, route_sent in zip(
            outer.total, outer.sent, inner.total, inner.sent, strict=True
        )
    ]


class Touch:
    """Reads `kib` KiB of other data, a byte in every `stride` (64: every cache line; 4,160:
    one line on each page) before each request: surroundings that evict the middleware's
    memory from the caches (or its pages from the TLB), and nothing else (no span, no
    context, no instrumentation)."""

    def __init__(self, app: Any, kib: int, stride: int = 64) -> None:
        self.app = app
        self.data = memoryview(bytearray(kib * 1024))
        self.stride = stride

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        sum(self.data[:: self.stride])
        await self.app(scope, receive, send)


OWN_TOUCH_KIB = (256, 1024, 4096)
# one cache line on each of this many pages (4,160 bytes apart: a page and a line)
OWN_TOUCH_PAGES = 6144


async def own_time_profile(rounds: int, batch: int) -> dict[str, list[float]]:
    """`--own-time`: per surrounding, the median over requests of the middleware's own time
    (tracing off), one value per round."""
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(CountingExporter()))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])

    def clocked() -> tuple[OwnClock, OwnClock]:
        route = OwnClock(Router(routes=[Route("/hello", hello)]))
        middleware = FidelityMiddleware(route, policy=fidelity_policy(), telemetry=False)
        return OwnClock(middleware), route

    stacks: dict[str, tuple[OwnClock, OwnClock, Any]] = {}
    outer, inner = clocked()
    stacks["on a bare route"] = (outer, inner, outer)
    outer, inner = clocked()
    stacks["inside the instrumented request"] = (
        outer,
        inner,
        OpenTelemetryMiddleware(outer, tracer_provider=tp, meter_provider=mp),
    )
    outer, inner = clocked()
    stacks["inside SdkWork (the SDK's work, unrelated)"] = (outer, inner, SdkWork(outer))
    for kib in OWN_TOUCH_KIB:
        outer, inner = clocked()
        stacks[f"after reading {kib} KiB of other data"] = (outer, inner, Touch(outer, kib))
    outer, inner = clocked()
    stacks[f"after reading one line on each of {OWN_TOUCH_PAGES:,} pages"] = (
        outer,
        inner,
        Touch(outer, OWN_TOUCH_PAGES * 4160 // 1024, 4160),
    )
    medians: dict[str, list[float]] = {name: [] for name in stacks}
    for r in range(rounds + 1):  # the first round warms up
        for name, (outer, inner, app) in stacks.items():
            await run_batch(app, batch)
            if r:
                medians[name].append(statistics.median(own_times(outer, inner)) / 1e3)
            for clock in (outer, inner):
                clock.total.clear()
                clock.sent.clear()
        print(f"\rround {r}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tp.shutdown()
    mp.shutdown()
    return medians


def own_time_report(medians: dict[str, list[float]], rounds: int, batch: int) -> str:
    build = "compiled (mypyc)" if getattr(fidelity_mw, "compiled", False) else "pure Python"
    base = medians["on a bare route"]
    lines = [
        f"The middleware's own time, tracing off (`--own-time`, {build} build):",
        "",
        "| where | own µs per request | x on a bare route (paired) |",
        "|---|---:|---:|",
    ]
    for name, values in medians.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(values):.2f} | {statistics.median(ratios):.2f} |"
        )
    lines += [
        "",
        f"{rounds} rounds x {batch} sequential requests per surrounding; per round the median "
        "over requests of the time between entering the middleware and leaving it, less the "
        "route's time below it and the sends above it (`perf_counter_ns`, the clocks' own "
        "cost the same in every row). The same code and the same instructions in every row: "
        "what differs is how much other memory a request touches between two runs of it.",
    ]
    return "\n".join(lines)


class Capture:
    """Passes the hooks through to `inner`, keeping the last request's context and scope."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ctx: Any = None
        self.scope: Any = None

    def start(self, ctx: Any, scope: Any) -> Any:
        self.ctx, self.scope = ctx, scope
        return self.inner.start(ctx, scope)

    def before_response_end(self, ctx: Any, scope: Any, token: Any) -> None:
        self.inner.before_response_end(ctx, scope, token)

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        self.inner.end(ctx, scope, token)


HOOK_STEPS = ("span only", "start", "+ before_response_end", "+ end")


SDK_FLOOR = "SDK set_attributes alone"


def _hook_loop(tracer: Any, observer: Any, ctx: Any, scope: Any, steps: int, n: int) -> float:
    """CPU seconds per iteration: a SERVER span started, made current and ended as the
    ASGI instrumentation does, with the first `steps` hooks of `observer` around it."""
    start, before_end, end = observer.start, observer.before_response_end, observer.end
    attach, detach, in_context = (
        otel_context.attach,
        otel_context.detach,
        trace_api.set_span_in_context,
    )
    began = time.process_time()
    for _ in range(n):
        span = tracer.start_span("GET /hello", kind=SpanKind.SERVER, attributes={"n": 1})
        attached = attach(in_context(span))
        token = start(ctx, scope) if steps >= 1 else None
        if steps >= 2:
            before_end(ctx, scope, token)
        span.end()
        detach(attached)
        if steps >= 3:
            end(ctx, scope, token)
    return (time.process_time() - began) / n


async def hooks_profile(baseline: str | None, repeats: int, n: int) -> dict[str, list[float]]:
    """Per observer: the minimum time of each step of `HOOK_STEPS`, over interleaved repeats."""
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(CountingExporter()))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
    routes = [Route("/hello", hello)]
    observers = {"fidelity_mw": (FidelityMiddleware, fidelity_policy(), Telemetry)}
    if baseline is not None:
        old = baseline_package(baseline)
        policy = old.Policy(rate_limits=[old.RateLimit(name="per-client", rate="1000000000/s")])
        telemetry_class = importlib.import_module(f"{old.__name__}.telemetry").Telemetry
        observers[f"fidelity_mw@{baseline}"] = (old.FidelityMiddleware, policy, telemetry_class)
    captured = {}
    for name, (middleware, policy, telemetry_class) in observers.items():
        observer = telemetry_class(tracer_provider=tp, meter_provider=mp)
        capture = Capture(observer)
        app = Starlette(routes=routes)
        app.add_middleware(middleware, policy=policy, observer=capture)
        await run_batch(OpenTelemetryMiddleware(app, tracer_provider=tp, meter_provider=mp), 300)
        captured[name] = (observer, capture.ctx, capture.scope)
    tracer = tp.get_tracer("opentelemetry.instrumentation.asgi")
    # The SDK's share: the attributes our observer sets, set by one `set_attributes` and
    # nothing else (no span lookup, summary or metrics) - the floor of any observer that
    # exports the same schema through the public API.
    observer, ctx, scope = captured["fidelity_mw"]
    probe = tracer.start_span("GET /hello", kind=SpanKind.SERVER)
    attached = otel_context.attach(trace_api.set_span_in_context(probe))
    token = observer.start(ctx, scope)
    observer.before_response_end(ctx, scope, token)
    probe.end()
    otel_context.detach(attached)
    observer.end(ctx, scope, token)
    captured[SDK_FLOOR] = (SetAttributesOnly(dict(probe.attributes or {})), ctx, scope)
    best = {name: [float("inf")] * len(HOOK_STEPS) for name in captured}
    for r in range(repeats):
        for name, (observer, ctx, scope) in captured.items():
            for steps in range(len(HOOK_STEPS)):
                took = _hook_loop(tracer, observer, ctx, scope, steps, n)
                best[name][steps] = min(best[name][steps], took)
        print(f"\rrepeat {r + 1}/{repeats}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tp.shutdown()
    mp.shutdown()
    return best


def hooks_report(best: dict[str, list[float]], repeats: int, n: int) -> str:
    build = "compiled (mypyc)" if getattr(fidelity_mw, "compiled", False) else "pure Python"
    lines = [
        f"The observer's hooks alone (`--hooks`, {build} build), µs per request over "
        "the span alone:",
        "",
        "| observer | " + " | ".join(HOOK_STEPS[1:]) + " | span alone µs |",
        "|---|" + "---:|" * len(HOOK_STEPS),
    ]
    for name, mins in best.items():
        steps = [f"{(mins[i] - mins[0]) * 1e6:+.2f}" for i in range(1, len(HOOK_STEPS))]
        lines.append(f"| {name} | " + " | ".join(steps) + f" | {mins[0] * 1e6:.2f} |")
    lines += [
        "",
        f"Minimum of {repeats} interleaved repeats x {n} iterations, process CPU time; one "
        "captured allowed request (3 decisions, all `allow`) annotated again each time; "
        "each step includes the ones before it, so the last step's column is the observer's "
        "whole cost per request (the last column is the span alone, for scale). "
        f"`{SDK_FLOOR}`: the same attributes set by one `set_attributes` and nothing "
        "else, the SDK's share (the floor for this schema through the public API).",
    ]
    return "\n".join(lines)


def paired(values: list[float], base: list[float]) -> tuple[float, float]:
    diffs = [v - b for v, b in zip(values, base, strict=True)]
    ratios = [v / b for v, b in zip(values, base, strict=True)]
    return statistics.median(diffs), statistics.median(ratios)


def baseline_of(name: str) -> str:
    if name.startswith("instr"):
        return "instr"
    if name.startswith("sdk-work"):
        return "sdk-work"
    if name == "bare":
        return name
    return "fidelity-off"


def report(
    samples: dict[str, list[float]],
    spans: dict[str, tuple[float, float]],
    gcs: dict[str, tuple[list[float], float]],
    counts: dict[str, float],
    rounds: int,
    batch: int,
    keep_scopes: bool,
) -> tuple[str, bool]:
    lines = [
        "| variant | median CPU µs/request | vs | paired diff | paired ratio "
        "| spans/request (ours) |" + (" bytecodes/request | vs |" if counts else ""),
        "|---|---:|---|---:|---:|---:|" + ("---:|---:|" if counts else ""),
    ]
    for name, values in samples.items():
        base = baseline_of(name)
        diff, ratio = paired(values, samples[base])
        total, ours = spans[name]
        vs = "—" if base == name else base
        counted = ""
        if counts:
            more = "—" if base == name else f"{counts[name] - counts[base]:+.0f}"
            counted = f" {counts[name]:.0f} | {more} |"
        lines.append(
            f"| {name} | {statistics.median(values) * 1e6:.2f} | {vs} "
            f"| {'—' if base == name else f'{diff * 1e6:+.2f} µs'} "
            f"| {'—' if base == name else f'{ratio:.3f}'} | {total:g} ({ours:g}) |" + counted
        )
    _, ratio = paired(samples["instr+fidelity"], samples["instr"])
    _, off_ratio = paired(samples["instr+fidelity-off"], samples["instr"])
    nosdk, _ = paired(samples["fidelity-nosdk"], samples["fidelity-off"])
    telemetry_only, _ = paired(samples["instr+fidelity"], samples["instr+fidelity-off"])
    extra_spans = spans["instr+fidelity"][0] - spans["instr"][0]
    ratio_ok = ratio <= TARGET_RATIO
    off_ok = off_ratio <= TARGET_OFF_RATIO
    spans_ok = extra_spans == 0
    lines += [
        "",
        f"- fidelity with tracing on adds **{(ratio - 1) * 100:+.1f} %** to the instrumented "
        f"request (target ≤ +{(TARGET_RATIO - 1) * 100:.0f} %): "
        f"{'met' if ratio_ok else 'MISSED'}; of which the telemetry itself "
        f"(instr+fidelity - instr+fidelity-off) is {telemetry_only * 1e6:+.2f} µs.",
        f"- the middleware with tracing off inside the instrumented request: "
        f"**{off_ratio:.3f}x** (target ≤ {TARGET_OFF_RATIO:.2f}x): "
        f"{'met' if off_ok else 'MISSED'}.",
        f"- extra spans per inbound request: **{extra_spans:g}** (target 0): "
        f"{'met' if spans_ok else 'MISSED'}"
        + (
            " - this FidelityMiddleware does not call `before_response_end`, so the "
            "decisions went to a child span (see docs/telemetry.md)."
            if spans["instr+fidelity"][1]
            else "."
        ),
        f"- the observer without an SDK (fidelity-nosdk - fidelity-off): "
        f"**{nosdk * 1e6:+.2f} µs** per request.",
    ]
    for name in samples:
        if "@" in name:
            current = name.split("@")[0]
            diff, ratio = paired(samples[current], samples[name])
            fewer = f"; {counts[current] - counts[name]:+.0f} bytecodes/request" if counts else ""
            lines.append(
                f"- {current} against {name} (paired): {diff * 1e6:+.2f} µs, {ratio:.3f}x{fewer}."
            )
    if "sdk-work" in samples:
        pairs = (
            ("fidelity-off", "bare", "on a bare route"),
            ("instr+fidelity-off", "instr", "inside the instrumented request"),
            ("sdk-work+fidelity-off", "sdk-work", "inside the same SDK work unrelated to it"),
        )
        parts = []
        for name, base, where in pairs:
            diff, _ = paired(samples[name], samples[base])
            counted = f", {counts[name] - counts[base]:+.0f} bytecodes" if counts else ""
            parts.append(f"{diff * 1e6:+.2f} µs {where}{counted}")
        lines.append(
            "- the middleware alone (`--working-set`): "
            + "; ".join(parts)
            + ". The SDK work never touches the request (spans on another provider, never "
            "made current): where the middleware costs as much there as inside the "
            "instrumented request, the extra cost over a bare route is the request's larger "
            "working set, not the instrumentation's context or wrappers."
        )
    if all(name in samples for name, _, _ in ABLATION):
        lines += ["", "Telemetry piece by piece (`--ablation`, median of paired differences):", ""]
        for name, before, what in ABLATION:
            diff, _ = paired(samples[name], samples[before])
            counted = f", {counts[name] - counts[before]:+.0f} bytecodes" if counts else ""
            lines.append(f"- {diff * 1e6:+.2f} µs{counted}  {what} (`{name}` - `{before}`)")
    if gcs:
        lines += [
            "",
            "Garbage collection (`--gc`, untimed passes of "
            f"{batch} requests, scopes {'kept' if keep_scopes else 'dropped'}):",
            "",
            "| variant | gen0 / request | gen1 / request | gen2 / request "
            "| objects in reference cycles / request |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, (per_gen, cyclic) in gcs.items():
            lines.append(
                f"| {name} | {per_gen[0]:.4f} | {per_gen[1]:.4f} | {per_gen[2]:.5f} | {cyclic:g} |"
            )
    lines += [
        "",
        f"{rounds} interleaved rounds x {batch} sequential requests per variant per round, "
        "in-process ASGI calls (no server), process CPU time per request (medians; paired "
        "diffs and ratios per round); "
        + (
            "every scope of a batch kept until the batch ends. "
            if keep_scopes
            else "each request's scope dropped once answered, as a server does. "
        )
        + "OpenTelemetryMiddleware with its defaults "
        "(server span + two `http send` spans); SDK TracerProvider with a "
        "SimpleSpanProcessor into a counting no-op exporter; SDK MeterProvider with an "
        "in-memory reader. FidelityMiddleware as in the inbound benchmark (permissive "
        "per-client limit, route breaker, deadline header; memory state): 3 decisions "
        "per request, all `allow`: one packed `fidelity.decisions` attribute, no span event "
        '(the default `decision_events="non_allow"`).',
    ]
    return "\n".join(lines), ratio_ok and off_ok and spans_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--baseline", metavar="REV", help="add fidelity_mw as of git revision REV")
    parser.add_argument("--ablation", action="store_true", help="add the telemetry piece by piece")
    parser.add_argument("--gc", action="store_true", help="count collections and cyclic garbage")
    parser.add_argument("--count", action="store_true", help="count bytecodes per request")
    parser.add_argument(
        "--working-set",
        action="store_true",
        help="add the middleware alone on a bare route and inside unrelated SDK work",
    )
    parser.add_argument(
        "--keep-scopes", action="store_true", help="keep each batch's scopes until it ends"
    )
    parser.add_argument(
        "--hooks", action="store_true", help="time the observer's hooks alone (see above)"
    )
    parser.add_argument(
        "--by-function",
        nargs="?",
        const="instr+fidelity,instr+fidelity-off",
        metavar="A,B",
        help="the telemetry's bytecodes and calls per request, function by function (print only)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count machine instructions per request with callgrind instead (print only)",
    )
    parser.add_argument("--requests", type=int, default=1000, help="with --instructions")
    parser.add_argument(
        "--variants",
        default=",".join(INSTRUCTION_VARIANTS),
        help="with --instructions: the variants to count (comma-separated)",
    )
    parser.add_argument(
        "--inside",
        action="store_true",
        help="with --instructions: the middleware inside the instrumented request against on "
        "a bare route, by function",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="with --instructions: callgrind's cache simulation too (misses per request)",
    )
    parser.add_argument(
        "--last-level",
        type=int,
        metavar="BYTES",
        help="with --instructions: the simulated last-level cache this size (e.g. 1048576, "
        "this machine's L2) instead of the machine's L3; implies --cache",
    )
    parser.add_argument(
        "--own-time",
        action="store_true",
        help="the middleware's own time (tracing off) on a bare route, inside the "
        "instrumented request and after reading other data (print only)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a callgrind run of one variant
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.requests)
        return
    if args.by_function:
        print(asyncio.run(by_function(args.by_function)))
        return
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind not found (Debian package valgrind)")
        if args.inside:
            print(inside_by_function(args.requests))
            return
        counts = {}
        misses: dict[str, dict[str, float]] = {}
        for name in args.variants.split(","):
            misses[name] = count_events(name, args.requests, args.cache, args.last_level)
            counts[name] = misses[name]["Ir"]
            print(f"{name}: {counts[name]:,.0f}", file=sys.stderr, flush=True)
        print(instructions_report(counts, args.requests))
        if args.cache or args.last_level:
            print(misses_report(misses))
        return
    if args.own_time:
        rounds = max(args.rounds // 3, 5)
        print(
            own_time_report(asyncio.run(own_time_profile(rounds, args.batch)), rounds, args.batch)
        )
        return
    if args.hooks:
        repeats, n = max(args.rounds // 2, 5), 5000
        best = asyncio.run(hooks_profile(args.baseline, repeats, n))
        print(hooks_report(best, repeats, n))
        return
    load_before = os.getloadavg()[0]
    samples, spans, gcs, counts = asyncio.run(
        measure(
            args.rounds,
            args.batch,
            args.seed,
            args.baseline,
            args.ablation,
            args.keep_scopes,
            args.gc,
            args.count,
            args.working_set,
        )
    )
    table, ok = report(samples, spans, gcs, counts, args.rounds, args.batch, args.keep_scopes)
    # The timed ratios follow the machine's load, not only the code: the middleware's own
    # time inside the instrumented request is its memory read back from the outer caches
    # (`--own-time`), and other processes evict more of it the busier the machine is.
    table += (
        f"\n\nLoad average (1 min) {load_before:.1f} before the rounds, "
        f"{os.getloadavg()[0]:.1f} after."
    )
    print(table)
    if not args.no_write:
        write_section("Telemetry overhead", f"{stamp()}\n\n{table}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
