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

Targets: instr+fidelity <= 1.10 x instr (median of paired per-round ratios), and
no extra span per inbound request (spans per request equal in both). The
no-SDK cost is fidelity-nosdk - fidelity-off.

    .venv/bin/python benchmarks/telemetry_overhead.py [--rounds 30] [--batch 1000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from starlette.applications import Starlette
from starlette.routing import Route

from benchmarks import _asgi
from benchmarks._asgi import hello
from benchmarks._results import stamp, write_section
from benchmarks.overhead import fidelity_policy
from fidelity_mw import FidelityMiddleware
from fidelity_mw.telemetry import Telemetry
from fidelity_mw.telemetry.observer import global_tracer_provider

TARGET_RATIO = 1.10


class CountingExporter(SpanExporter):
    """Drops spans, counting them (and noting who made them)."""

    def __init__(self) -> None:
        self.count = 0
        self.fidelity_spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        for span in spans:
            scope = span.instrumentation_scope
            if scope is not None and scope.name == "fidelity_mw":
                self.fidelity_spans += 1
        return SpanExportResult.SUCCESS


async def run_batch(app: Any, n: int) -> float:
    """CPU seconds per request (process time: other processes' load counts less)."""
    return await _asgi.run_batch(app, n, timer=time.process_time)


def build(tp: TracerProvider, mp: MeterProvider) -> dict[str, Any]:
    routes = [Route("/hello", hello)]

    def starlette(**fidelity: Any) -> Starlette:
        app = Starlette(routes=routes)
        if fidelity:
            app.add_middleware(FidelityMiddleware, policy=fidelity_policy(), **fidelity)
        return app

    def instrumented(app: Any) -> Any:
        return OpenTelemetryMiddleware(app, tracer_provider=tp, meter_provider=mp)

    telemetry = Telemetry(tracer_provider=tp, meter_provider=mp)
    return {
        "instr": instrumented(starlette()),
        "instr+fidelity": instrumented(starlette(observer=telemetry)),
        "instr+fidelity-off": instrumented(starlette(telemetry=False)),
        "fidelity-off": starlette(telemetry=False),
        "fidelity-nosdk": starlette(telemetry=True),
    }


async def spans_per_request(app: Any, exporter: CountingExporter, n: int) -> tuple[float, float]:
    before, before_ours = exporter.count, exporter.fidelity_spans
    await run_batch(app, n)
    return (exporter.count - before) / n, (exporter.fidelity_spans - before_ours) / n


async def measure(
    rounds: int, batch: int, seed: int
) -> tuple[dict[str, list[float]], dict[str, tuple[float, float]]]:
    if global_tracer_provider() is not None:
        raise SystemExit("a global TracerProvider is set: the no-SDK variant would be wrong")
    exporter = CountingExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
    apps = build(tp, mp)
    for app in apps.values():  # warm up: middleware stacks, plans, instruments
        await run_batch(app, 300)
    spans = {name: await spans_per_request(app, exporter, 200) for name, app in apps.items()}
    samples: dict[str, list[float]] = {name: [] for name in apps}
    order = list(apps)
    shuffle = random.Random(seed).shuffle
    for r in range(rounds):
        shuffle(order)
        for name in order:
            samples[name].append(await run_batch(apps[name], batch))
        print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tp.shutdown()
    mp.shutdown()
    return samples, spans


def paired(values: list[float], base: list[float]) -> tuple[float, float]:
    diffs = [v - b for v, b in zip(values, base, strict=True)]
    ratios = [v / b for v, b in zip(values, base, strict=True)]
    return statistics.median(diffs), statistics.median(ratios)


def report(
    samples: dict[str, list[float]],
    spans: dict[str, tuple[float, float]],
    rounds: int,
    batch: int,
) -> tuple[str, bool]:
    baselines = {
        "instr": "instr",
        "instr+fidelity": "instr",
        "instr+fidelity-off": "instr",
        "fidelity-off": "fidelity-off",
        "fidelity-nosdk": "fidelity-off",
    }
    lines = [
        "| variant | median CPU µs/request | vs | paired diff | paired ratio "
        "| spans/request (ours) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, values in samples.items():
        base = baselines[name]
        diff, ratio = paired(values, samples[base])
        total, ours = spans[name]
        vs = "—" if base == name else base
        lines.append(
            f"| {name} | {statistics.median(values) * 1e6:.2f} | {vs} "
            f"| {'—' if base == name else f'{diff * 1e6:+.2f} µs'} "
            f"| {'—' if base == name else f'{ratio:.3f}'} | {total:g} ({ours:g}) |"
        )
    _, ratio = paired(samples["instr+fidelity"], samples["instr"])
    nosdk, _ = paired(samples["fidelity-nosdk"], samples["fidelity-off"])
    telemetry_only, _ = paired(samples["instr+fidelity"], samples["instr+fidelity-off"])
    extra_spans = spans["instr+fidelity"][0] - spans["instr"][0]
    ratio_ok = ratio <= TARGET_RATIO
    spans_ok = extra_spans == 0
    lines += [
        "",
        f"- fidelity with tracing on adds **{(ratio - 1) * 100:+.1f} %** to the instrumented "
        f"request (target ≤ +{(TARGET_RATIO - 1) * 100:.0f} %): "
        f"{'met' if ratio_ok else 'MISSED'}; of which the telemetry itself "
        f"(instr+fidelity - instr+fidelity-off) is {telemetry_only * 1e6:+.2f} µs.",
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
        "",
        f"{rounds} interleaved rounds x {batch} sequential requests per variant per round, "
        "in-process ASGI calls (no server), process CPU time per request (medians; paired "
        "diffs and ratios per round). OpenTelemetryMiddleware with its defaults "
        "(server span + two `http send` spans); SDK TracerProvider with a "
        "SimpleSpanProcessor into a counting no-op exporter; SDK MeterProvider with an "
        "in-memory reader. FidelityMiddleware as in the inbound benchmark (permissive "
        "per-client limit, route breaker, deadline header; memory state): 3 decisions "
        "per request, all `allow`: one packed `fidelity.decisions` attribute, no span event "
        '(the default `decision_events="non_allow"`).',
    ]
    return "\n".join(lines), ratio_ok and spans_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    samples, spans = asyncio.run(measure(args.rounds, args.batch, args.seed))
    table, ok = report(samples, spans, args.rounds, args.batch)
    print(table)
    if not args.no_write:
        write_section("Telemetry overhead", f"{stamp()}\n\n{table}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
