"""out44: a long request's room making, counted by kind in C (`DecisionContext._make_room`).

An outbound call inside a request appends a record to the request's context; past
`MAX_DECISIONS` records the context drops the run between its kept head and tail and
counts each dropped record by kind. Record by record in Python that was ~60 bytecodes a
record (a record is a tuple subclass, whose subscripts CPython 3.11 does not specialise):
amortised, 60 of the 609 bytecodes an outbound call inside a long request cost beyond a
pass-through layer (`benchmarks/outbound.py --count`, whose in-request batch is such a
request), and why that call gained nothing where the same call outside a request did.
Now a run of records all dropped is counted by kind in C and each kind once. The counts,
their order, the records kept and the total must be what the record-by-record count
gives: a differential test against that count, kept here as it was.
"""

from __future__ import annotations

import random
import sys
from types import FrameType
from typing import Any

import pytest

import fidelity_mw.context as context
from fidelity_mw.context import (
    ALLOW,
    KEEP_HEAD,
    KEEP_TAIL,
    MAX_DECISIONS,
    MAX_FLAGGED,
    Decision,
    DecisionContext,
)

_STALE = ("cache", "fallback")
_SUBJECT_LAYERS = frozenset({"ratelimit", "retry", "budget"})


class Reference:
    """The record-by-record room making as it was before out44 (context.py at e28bb20)."""

    def __init__(self) -> None:
        self.records: list[Decision] = []
        self.dropped: dict[tuple[str, ...], list[int]] = {}
        self.total = 0
        self.sealed = 0
        self.room_at = MAX_DECISIONS

    def append(self, d: Decision) -> None:
        if len(self.records) >= self.room_at:
            self.make_room()
        self.records.append(d)

    def seal(self, exported: int) -> None:
        self.sealed = exported
        self.room_at = exported + MAX_DECISIONS

    def make_room(self) -> None:
        records = self.records
        lo = KEEP_HEAD if self.sealed < KEEP_HEAD else self.sealed
        hi = len(records) - KEEP_TAIL
        if hi <= lo:
            return
        flagged = sum(1 for d in records[KEEP_HEAD:lo] if d[2] != ALLOW)
        kept = []
        n = 0
        for d in records[lo:hi]:
            verdict = d[2]
            if verdict != ALLOW and flagged < MAX_FLAGGED:
                flagged += 1
                kept.append(d)
                continue
            layer = d[0]
            key = (layer, d[1] if layer in _SUBJECT_LAYERS else "", verdict, d[3], d[4])
            counts = self.dropped.get(key)
            if counts is None:
                if len(self.dropped) >= 256:
                    key = (layer, "_other", verdict, d[3], d[4])
                    counts = self.dropped.get(key)
                if counts is None:
                    counts = self.dropped[key] = [0, 0]
            counts[0] += 1
            if d[4] in _STALE or d[5] > 1.0:
                counts[1] += 1
            n += 1
        records[lo:hi] = kept
        self.total += n


def _record(rnd: random.Random, subjects: int, p_flag: float, at: float) -> Decision:
    layer = rnd.choice(("retry", "budget", "ratelimit", "breaker", "lb", "deadline"))
    verdict = ALLOW if rnd.random() >= p_flag else rnd.choice(("reject", "give_up", "shed"))
    return Decision(
        layer,
        f"up{rnd.randrange(subjects)}",
        verdict,
        rnd.choice(("attempt", "retry", "closed", "deadline_passed")),
        rnd.choice(("memory", "redis", "cache", "fallback", "request")),
        rnd.choice((0.0, 0.0, 0.5, 1.0, 1.5, rnd.random() * 3.0)),
        at,
    )


# (records, distinct subjects, share of records not `allow`, chance of a seal per record)
CASES = [
    (3_000, 1, 0.0, 0.0),  # one upstream's attempts: the common long request
    (3_000, 4, 0.0, 0.002),  # sealed now and then, as telemetry seals
    (3_000, 3, 0.01, 0.0),  # a few refusals: kept (the record-by-record path)
    (4_000, 5, 0.3, 0.001),  # past MAX_FLAGGED kept: then every record goes
    (6_000, 400, 0.0, 0.0),  # past 256 kinds: folded into `_other`
    (6_000, 400, 0.05, 0.003),
]


@pytest.mark.parametrize(("n", "subjects", "p_flag", "p_seal"), CASES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_room_making_counts_as_record_by_record(
    n: int, subjects: int, p_flag: float, p_seal: float, seed: int
) -> None:
    rnd = random.Random(seed)
    ctx = DecisionContext(engine=None, route="/r", method="GET", started_at=0.0)  # type: ignore[arg-type]
    ref = Reference()
    for i in range(n):
        d = _record(rnd, subjects, p_flag, float(i))
        ctx.decisions.append(d)
        ref.append(d)
        if p_seal and rnd.random() < p_seal:
            exported = len(ctx.decisions)  # (makes room first when due, as telemetry's read)
            if len(ref.records) >= ref.room_at:
                ref.make_room()
            ctx.seal(exported)
            ref.seal(exported)
        assert len(ctx._decisions) == len(ref.records)
    assert ctx._decisions == ref.records
    assert ctx.dropped_total == ref.total > 0
    assert list((ctx._dropped or {}).items()) == list(ref.dropped.items())  # order too


def test_an_unhashable_field_is_counted_record_by_record() -> None:
    """A record whose counted fields do not hash (a foreign layer's) falls back to the
    one-by-one count, which fails on it as it always did, in the same state."""
    ctx = DecisionContext(engine=None, route="/r", method="GET", started_at=0.0)  # type: ignore[arg-type]
    ref = Reference()
    odd = Decision("retry", ["a"], ALLOW, "attempt", "memory")  # type: ignore[arg-type]
    for i in range(MAX_DECISIONS):
        d = odd if i == 100 else Decision("retry", "up", ALLOW, "attempt", "memory", 0.0, i)
        ctx._decisions.append(d)
        ref.records.append(d)
    with pytest.raises(TypeError):
        ctx.decisions  # noqa: B018
    with pytest.raises(TypeError):
        ref.make_room()
    assert ctx._decisions == ref.records
    assert len(ref.records) == MAX_DECISIONS
    assert ctx.dropped_total == ref.total == 0
    assert list((ctx._dropped or {}).items()) == list(ref.dropped.items())


@pytest.mark.skipif(
    not context.__file__.endswith(".py"), reason="counts bytecodes: pure build only"
)
def test_dropping_allowed_records_costs_few_bytecodes_each() -> None:
    """2,000 allowed attempts' records: the bytecodes room making runs per dropped record
    (e28bb20: ~60 a record, record by record; now a few per run of ~224)."""
    ctx = DecisionContext(engine=None, route="/r", method="GET", started_at=0.0)  # type: ignore[arg-type]
    d = Decision("retry", "up", ALLOW, "attempt", "memory", 0.0, 0.0, {"attempt": 1})
    records = ctx._decisions
    ops = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal ops
        if frame.f_code.co_filename != context.__file__:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            ops += 1
        return tracer

    for _ in range(2_000):
        if len(records) >= ctx._room_at:
            sys.settrace(tracer)
            try:
                ctx._make_room(records)
            finally:
                sys.settrace(None)
        records.append(d)
    assert ctx.dropped_total > 1_500
    per_record = ops / ctx.dropped_total
    assert per_record < 5, per_record  # (now ~0.8; e28bb20 ~67)
