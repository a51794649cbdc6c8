"""benchmarks/telemetry_overhead.py's SDK floor and pairwise split by function measure what
they say (counted, never timed)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import telemetry_overhead as tel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import fidelity_mw


def test_sdk_floor_sets_what_the_observer_sets_and_nothing_of_ours() -> None:
    """`instr+fid:sdk-floor` leaves the server span with the same `fidelity.*` attributes as
    the real observer, through one `set_attributes`, and its exporter captures them once."""

    async def run() -> tuple[dict[str, object], dict[str, object], dict[str, object]]:
        exporter = tel.CountingExporter()
        kept = InMemorySpanExporter()
        tp = TracerProvider()
        tp.add_span_processor(SimpleSpanProcessor(exporter))
        tp.add_span_processor(SimpleSpanProcessor(kept))
        mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
        apps = tel.build(tp, mp, ablation=True)
        await tel.floor_attributes(apps, exporter)
        assert not exporter.capture  # off again: no variant pays for the capture
        captured = dict(exporter.fidelity_attributes)

        def server_fidelity_attributes() -> dict[str, object]:
            spans = [
                s for s in kept.get_finished_spans() if "fidelity.decisions" in (s.attributes or {})
            ]
            assert spans
            return {
                k: v for k, v in (spans[-1].attributes or {}).items() if k.startswith("fidelity.")
            }

        kept.clear()
        await tel.run_batch(apps["instr+fidelity"], 1)
        ours = server_fidelity_attributes()
        kept.clear()
        await tel.run_batch(apps["instr+fid:sdk-floor"], 1)
        floor = server_fidelity_attributes()
        tp.shutdown()
        mp.shutdown()
        return captured, ours, floor

    captured, ours, floor = asyncio.run(run())
    assert captured == ours == floor
    # a plain request's lean attributes (`request_attributes="lean"`)
    assert {"fidelity.decisions"} <= set(floor)
    assert "fidelity.route" not in floor


def test_by_function_splits_any_two_variants() -> None:
    """`--by-function A,B`: the telemetry above the SDK floor is ours (the observer's code),
    and the floor's own rows are the SDK's attribute cleaning."""
    above = asyncio.run(tel.by_function("instr+fidelity,instr+fid:sdk-floor", n=20))
    floor = asyncio.run(tel.by_function("instr+fid:sdk-floor,instr+fidelity-off", n=20))
    if not getattr(fidelity_mw, "compiled", False):  # compiled, ours run no bytecodes
        assert "Telemetry.before_response_end" in above
    assert "_clean_attribute_value" not in above.split("\n\n")[0]
    assert "_clean_attribute_value" in floor
    assert "`instr+fidelity` - `instr+fid:sdk-floor`" in above
