"""benchmarks/hops_blackbox.py judges what it says: made-up answers, no servers, no timings.

A request is healthy when a healthy instance of C existed for its whole life; a healthy
request not answered 200 was failed by the chain; the layer that decided it is read from
the hops' records, the hop nearest the client first.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hops_blackbox import Answer, healthy, judge, layer_of


def _answer(rid: str, sent: float, ended: float, status: int, **headers: str) -> Answer:
    return Answer(rid, sent, ended, status, dict(headers))


def test_a_request_overlapping_an_outage_of_every_instance_is_not_healthy() -> None:
    on, off = 1.0, 2.0
    assert healthy("all_503", _answer("a", 0.2, 0.9, 502), on, off)  # ended before it
    assert not healthy("all_503", _answer("b", 0.9, 1.1, 502), on, off)  # ran into it
    assert not healthy("all_down", _answer("c", 1.5, 2.5, 502), on, off)
    assert healthy("all_down", _answer("d", 2.0, 2.1, 502), on, off)  # sent after it
    # one instance failing: the two others are healthy the whole time
    assert healthy("one_down", _answer("e", 1.5, 1.6, 502), on, off)


def test_the_deciding_layer_is_the_nearest_refusal_else_the_last_give_up() -> None:
    give_up = ("breaker", "give_up", "breaker_open", "c", {})
    records = {
        ("A", "r1"): [{"decided_by": "ratelimit", "decisions": []}],
        ("B", "r1"): [{"decided_by": "app", "decisions": [give_up]}],
        ("A", "r2"): [{"decided_by": "app", "decisions": []}],
        ("B", "r2"): [{"decided_by": "app", "decisions": [give_up]}],
    }
    assert layer_of("r1", records) == "A:ratelimit"
    assert layer_of("r2", records) == "B:breaker/breaker_open"
    assert layer_of("r3", records) == "?"


def test_judge_counts_healthy_failures_calls_and_resends() -> None:
    answers = [
        _answer("r0", 0.1, 0.2, 200),
        _answer("r1", 1.2, 1.3, 502, **{"retry-after": "1"}),  # in the outage: not healthy
        _answer("r2", 2.1, 2.2, 502),  # after it: a healthy request failed, no Retry-After
        _answer("r3", 2.3, 2.4, 500),
    ]
    rec = {"decided_by": "app", "decisions": [("retry", "give_up", "attempts", "c", {})]}
    resent = {"decided_by": "app", "decisions": [("retry", "give_up", "deadline", "c", {})]}
    records = {("B", "r1"): [resent, rec], ("B", "r2"): [rec], ("B", "r3"): [rec]}
    calls = Counter({"r0": 1, "r1": 4, "r2": 3, "r3": 3})
    out = judge("ours", "all_503", answers, 1.0, 2.0, records, calls, Counter())
    assert out["healthy_failed"] == 2
    assert out["failed_after_fault"] == 2
    assert out["last_failure_after_fault_s"] == 0.3
    assert out["500s"] == 1
    assert out["refusals_without_retry_after"] == 0  # (a 502 is no refusal of ours)
    assert out["c_calls_max"] == 4
    assert out["c_calls_per_request_in_fault"] == 4.0
    assert out["b_tries_max"] == 2
    assert out["a_resent_after_b"] == {"deadline": 1}
    assert out["deciding_layers"] == {"B:retry/attempts": 2}
