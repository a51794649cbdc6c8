"""benchmarks/telemetry_overhead.py's callgrind readers (inb40): the events a run counted,
and the middleware inside the instrumentation against outside it, by function."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("opentelemetry.sdk")

from benchmarks import telemetry_overhead as bench


def _out(events: str, totals: str, body: str = "") -> str:
    return f"version: 1\ncreator: callgrind\nevents: {events}\n{body}totals: {totals}\n"


def test_events_are_read_by_name_and_per_request() -> None:
    texts = {
        0: _out("Ir Dr Dw I1mr D1mr", "1000 400 300 10 20"),
        100: _out("Ir Dr Dw I1mr D1mr", "3000 900 500 30 120"),
    }
    assert bench.callgrind_events(texts[0]) == {
        "Ir": 1000,
        "Dr": 400,
        "Dw": 300,
        "I1mr": 10,
        "D1mr": 20,
    }

    def runs(variant: str, requests: int, cache: bool = False) -> tuple[str, str]:
        assert cache
        return texts[0], texts[requests]

    old = bench.callgrind_texts
    bench.callgrind_texts = runs  # type: ignore[assignment]
    try:
        assert bench.count_events("bare", 100, cache=True) == {
            "Ir": 20.0,
            "Dr": 5.0,
            "Dw": 2.0,
            "I1mr": 0.2,
            "D1mr": 1.0,
        }
    finally:
        bench.callgrind_texts = old  # type: ignore[assignment]


def test_inside_is_the_difference_of_the_two_middleware_rows_by_function() -> None:
    def out(costs: dict[str, int]) -> str:
        body = "".join(f"fn={fn}\n1 {cost}\n" for fn, cost in costs.items())
        return _out("Ir", str(sum(costs.values())), body)

    # per 10 requests: the middleware's `f` costs 50 more inside, `g` 20 less
    runs = {
        "instr": ({"f": 0, "g": 0}, {"f": 100, "g": 100}),
        "instr+fidelity-off": ({"f": 0, "g": 0}, {"f": 1100, "g": 200}),
        "bare": ({"f": 0, "g": 0}, {"f": 10, "g": 10}),
        "fidelity-off": ({"f": 0, "g": 0}, {"f": 510, "g": 310}),
    }
    old = bench.callgrind_texts
    bench.callgrind_texts = lambda v, n, cache=False: (out(runs[v][0]), out(runs[v][1]))  # type: ignore[assignment]
    try:
        text = bench.inside_by_function(10)
    finally:
        bench.callgrind_texts = old  # type: ignore[assignment]
    assert "| +50 | +100 | +50 | `f` |" in text
    assert "| -20 | +10 | +30 | `g` |" in text
    assert "inside the instrumented request +110 instructions per request" in text
    assert "on a bare route +80" in text
