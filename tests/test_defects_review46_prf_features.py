"""benchmarks/features.py builds what each variant says and reports what it measured.

No timing is asserted: the apps are checked by their plans and answers, the reports on
made-up samples, and the callgrind parts by their arithmetic.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import features
from benchmarks._asgi import make_scope, receive


async def _serve(app: Any) -> tuple[int, dict[bytes, bytes]]:
    started: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.append(message)

    await app(make_scope(), receive, send)
    return started[0]["status"], dict(started[0]["headers"])


def _middleware(app: Any) -> Any:
    layer = app.middleware_stack  # built by the first request
    while not hasattr(layer, "engine"):
        layer = layer.app
    return layer


def test_parse_names_features_and_one_fields_mode() -> None:
    assert features.parse("frame") == (frozenset(), "always")
    assert features.parse(features.FULL) == (frozenset({"deadline", "breaker", "limit"}), "always")
    assert features.parse("limit+on_reject") == (frozenset({"limit"}), "on_reject")
    for bad in ("cache", "limit+never+on_reject", "deadline+on_reject", "breaker+breaker"):
        with pytest.raises(ValueError, match=r"variant|fields mode"):
            features.parse(bad)


@pytest.mark.parametrize(
    "name", [n for n in features.DEFAULT_VARIANTS if n not in features.REFERENCES]
)
def test_each_variant_switches_on_exactly_its_features(name: str) -> None:
    on, mode = features.parse(name)
    app = features.build_app(name)
    status, headers = asyncio.run(_serve(app))
    assert status == 200
    mw = _middleware(app)
    plan = mw.engine.plan_for({"type": "http", "method": "GET", "path": "/hello"})
    assert (plan.breaker is not None) == ("breaker" in on)
    assert bool(plan.limits) == ("limit" in on)
    # the deadline: armed from the request's header, or no default and a header never sent
    assert (plan.deadline_default_s is not None) == ("deadline" in on)
    assert ("x-request-timeout-ms" in mw.policy.deadline.header) == ("deadline" in on)
    assert mw.policy.rate_limit_headers == mode
    # RateLimit fields on the 200 only with a limit that sends them always
    assert (b"ratelimit" in headers) == ("limit" in on and mode == "always")
    assert (mw.observer is not None) == ("telemetry" in on)


def test_the_full_stack_is_overheads_fidelity_variant() -> None:
    from benchmarks.overhead import build_apps

    ours_app, theirs_app = features.build_app(features.FULL), build_apps()["fidelity"]
    asyncio.run(_serve(ours_app))
    asyncio.run(_serve(theirs_app))
    ours, theirs = _middleware(ours_app), _middleware(theirs_app)
    assert ours.policy == theirs.policy
    assert ours.observer is None
    assert theirs.observer is None


def test_every_step_compares_with_a_variant_of_the_run() -> None:
    names = list(features.DEFAULT_VARIANTS)
    rows = features.steps(names)
    assert [name for name, _, _ in rows] == names[1:]
    assert all(base in names for _, base, _ in rows)
    # asked for without its base, a step is read against bare
    assert features.steps(["bare", "deadline+limit"]) == [
        ("deadline+limit", "bare", "- route breaker")
    ]


def test_time_report_pairs_per_round_and_marks_the_goal() -> None:
    rounds = [
        {"bare": 10e-6, "frame": 12e-6, features.FULL: 19e-6, "deadline+breaker": 15e-6},
        {"bare": 11e-6, "frame": 13e-6, features.FULL: 20e-6, "deadline+breaker": 15e-6},
        {"bare": 9e-6, "frame": 11e-6, features.FULL: 18e-6, "deadline+breaker": 13e-6},
    ]
    names = ["bare", "frame", features.FULL, "deadline+breaker"]
    table = features.report_times({"pure": rounds}, names, "process CPU time")
    assert "| bare | the route alone | 10.00 µs | 1 | |" in table
    assert (
        "| frame | the frame alone (every feature off) | +2.00 | 1.200 ✓ (1.191-1.211) |  |"
        in table
    )
    assert "| deadline+breaker+limit | the full stack" in table
    assert "+9.00 | 1.900 (1.859-1.950) |" in table  # no ✓: over 1.3x
    # taken out of the full stack: the step is its difference to the full stack
    assert "| deadline+breaker | - per-client limit (and its fields) | +4.00 |" in table
    assert table.count("| -5.00 |") == 1  # 15-19, 15-20, 13-18 µs


def test_callgrind_parts_give_each_stretch_twice() -> None:
    names = ["bare", "frame"]
    # part 1: start-up and warm-up; then stretch, setup, stretch, setup, ... (4 stretches)
    totals = [10**9, 1000, 7, 1500, 7, 1502, 7, 1002, 5]
    assert features.served(totals, names, 10) == {"bare": (100.0, 100.2), "frame": (150.0, 150.2)}
    with pytest.raises(ValueError, match="parts"):
        features.served(totals[:5], names, 10)
    table = features.report_instructions({"pure": features.served(totals, names, 10)}, names, 10)
    assert "| bare | the route alone | 100 | 1 | |" in table
    assert "| frame | the frame alone (every feature off) | +50 | 1.500 |  |" in table
    assert "apart" not in table
    table = features.report_instructions(
        {"pure": {"bare": (100.0, 100.0), "frame": (150.0, 160.0)}}, names, 10
    )
    assert "Passes more than 1 % apart: pure frame: 150 / 160" in table


def test_segments_mark_every_stretch_for_callgrind(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "getppid", lambda: calls.append(1) or 1)
    features.segments(["bare", "frame"], 3)
    assert len(calls) == 2 * 4  # two marks around each of 4 stretches (2 variants x 2 passes)


def test_parts_are_read_in_dump_order(tmp_path: Path) -> None:
    for n, total in ((1, 5), (2, 7), (10, 11)):
        (tmp_path / f"cg.out.{n}").write_text(f"events: Ir\ntotals: {total}\n")
    (tmp_path / "cg.out").write_text("events: Ir\ntotals: 99\n")  # after the last mark
    assert features.parts(tmp_path, "cg.out") == [5, 7, 11]
