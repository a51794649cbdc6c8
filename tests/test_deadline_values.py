"""Deadline header values are parsed once per distinct value, with the same verdicts.

A kept value must read exactly as parsing it again would, malformed ones included
(each request still records its `malformed_header` decision), and the table stays
bounded whatever callers send.
"""

from __future__ import annotations

from typing import Any

import pytest

from fidelity_mw import DeadlineConfig, Policy
from fidelity_mw.context import DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.inbound import request as request_module
from fidelity_mw.inbound.request import RequestReader

SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "path": "/d", "client": ("h", 1)}


def reader() -> tuple[Engine, RequestReader, Any]:
    engine = Engine(Policy(breaker=None, deadline=DeadlineConfig(default_ms=30000)))
    return engine, RequestReader(engine), engine.plan_for(SCOPE)


def read(found: dict[bytes, bytes]) -> tuple[float | None, list[str], bool]:
    engine, r, plan = READER
    ctx = DecisionContext(engine, plan.route, "GET", 100.0)
    remaining, rejection = r.from_headers(SCOPE, ctx, plan, found, 100.0)
    assert rejection is None
    reasons = [d.reason for d in ctx.decisions]
    return remaining, reasons, ctx.deadline_from_caller


READER = reader()


@pytest.mark.parametrize(
    ("found", "want"),
    [
        ({b"x-request-timeout-ms": b"5000"}, (5.0, [], True)),
        ({b"x-request-timeout-ms": b"250"}, (0.25, [], True)),
        ({b"grpc-timeout": b"2S"}, (2.0, [], True)),
        # the shortest of both, whichever header carries it
        ({b"x-request-timeout-ms": b"5000", b"grpc-timeout": b"100m"}, (0.1, [], True)),
        ({b"x-request-timeout-ms": b"50", b"grpc-timeout": b"2S"}, (0.05, [], True)),
        # malformed: the route's default, and a decision saying so, every time
        ({b"x-request-timeout-ms": b"-0"}, (30.0, ["malformed_header"], False)),
        ({b"x-request-timeout-ms": b"1e3"}, (30.0, ["malformed_header"], False)),
        ({b"grpc-timeout": b"5000"}, (30.0, ["malformed_header"], False)),
        ({b"x-request-timeout-ms": b"7" * 80}, (30.0, ["malformed_header"], False)),
    ],
)
def test_a_value_reads_the_same_the_first_time_and_after(
    found: dict[bytes, bytes], want: tuple[float | None, list[str], bool]
) -> None:
    for _ in range(3):
        remaining, reasons, from_caller = read(found)
        assert (pytest.approx(remaining), reasons, from_caller) == want


def test_the_same_bytes_in_another_header_are_parsed_by_that_headers_grammar() -> None:
    # "5000" is 5 s as milliseconds, malformed as a grpc-timeout: kept apart per header
    assert read({b"x-request-timeout-ms": b"5000"})[0] == pytest.approx(5.0)
    assert read({b"grpc-timeout": b"5000"})[1] == ["malformed_header"]
    assert read({b"x-request-timeout-ms": b"5000"})[0] == pytest.approx(5.0)


def test_the_kept_values_stay_bounded_and_long_junk_is_not_kept() -> None:
    _, r, _ = READER
    tables = [parsed for _name, _raw, _parse, parsed in r.deadline_headers]
    for i in range(1, request_module._MAX_PARSED * 2 + 3):
        value = str(i).encode()
        assert read({b"x-request-timeout-ms": value})[0] == pytest.approx(i / 1000.0)
        assert all(len(t) <= request_module._MAX_PARSED for t in tables)
    long_junk = b"9" * (request_module._MAX_KEPT_CHARS + 1)
    read({b"x-request-timeout-ms": long_junk})
    assert all(long_junk not in t for t in tables)
